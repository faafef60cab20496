"""The worker runtime returns every slot it was granted, whatever happens to a request (SPEC §7.1:
a worker grants one CREDIT per slot that frees).

A minimal queue-node stand-in accepts the worker's link, opens streams to it and counts the credit
it holds: the worker's initial credit (its capacity), minus streams opened, plus CREDITs received.
Once every stream has ended and the worker is idle, that count must equal the capacity again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from casola.net.handshake import serve_tcp
from casola.net.link import LinkBase
from casola.wire import (
    FLAG_END,
    CancelMeta,
    ErrorCode,
    Event,
    Frame,
    FrameType,
    HelloAckMeta,
    HelloMeta,
    RequestMeta,
    encode_frame,
)
from casola.worker import Echo, WorkerConfig, WorkerRuntime
from tests.e2e.stack import run_uvloop

CAPACITY = 8


class FakeQueueNode:
    """Accepts one worker and lets a test write frames to it, several in one write if it likes."""

    def __init__(self) -> None:
        self.link: LinkBase | None = None
        self.up = asyncio.Event()
        self.answers: dict[int, list[Frame]] = {}
        self.credits = 0  # CREDIT grants received

    def on_hello(self, link: LinkBase, frame: Frame) -> None:
        assert isinstance(frame.meta, HelloMeta) and frame.meta.role == "worker"
        link.on_events = self.on_events
        link.send(Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(link.conn.version, "q", "local", 0)))
        self.link = link
        self.up.set()

    def on_events(self, link: LinkBase, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, Frame) and ev.type is FrameType.CREDIT:
                self.credits += ev.meta.grant  # type: ignore[union-attr]
            elif isinstance(ev, Frame) and ev.stream_id:
                self.answers.setdefault(ev.stream_id, []).append(ev)

    def held(self) -> int:
        """Slots the node may use now: the worker's send credit as the node's core counts it."""
        assert self.link is not None
        return self.link.conn.send_credit

    def write_together(self, *build: Callable[[int], list[Frame]]) -> list[int]:
        """Queue each group of frames (one new stream each) and write them all in one flush."""
        assert self.link is not None
        conn, sids = self.link.conn, []
        for make in build:
            sid = conn.next_stream_id()
            for frame in make(sid):
                conn.send(frame)
            sids.append(sid)
        self.link.flush()
        return sids


async def _started() -> tuple[FakeQueueNode, asyncio.Server, WorkerRuntime, Echo]:
    node = FakeQueueNode()
    server = await serve_tcp("127.0.0.1", 0, node.on_hello, auto_credit=False)
    port = server.sockets[0].getsockname()[1]
    echo = Echo()
    rt = WorkerRuntime(WorkerConfig(queue=[f"127.0.0.1:{port}"], capacity=CAPACITY), [echo], "")
    await rt.start()
    await rt.wait_registered()
    await node.up.wait()
    return node, server, rt, echo


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def _request(params: dict[str, object] | None = None) -> Callable[[int], list[Frame]]:
    meta = RequestMeta("echo", params=params or {})
    return lambda sid: [Frame(FrameType.REQUEST, sid, meta, b"x", FLAG_END)]


def _request_then_cancel(sid: int) -> list[Frame]:
    return [
        Frame(FrameType.REQUEST, sid, RequestMeta("echo", params={"delay-ms": 50}), b"x", FLAG_END),
        Frame(FrameType.CANCEL, sid, CancelMeta(ErrorCode.CANCELLED, "client went away")),
    ]


def test_request_and_cancel_in_one_read_return_the_slot() -> None:
    """The handler task is cancelled before it first runs: its cleanup must still give the slot back."""

    async def main() -> None:
        node, server, rt, _ = await _started()
        try:
            for _ in range(25):  # 200 requests, 8 at a time, each REQUEST+CANCEL in one write
                node.write_together(*([_request_then_cancel] * CAPACITY))
                await _until(lambda: node.held() == CAPACITY and rt.active == 0)
            assert rt.active == 0
            (sid,) = node.write_together(_request())  # the worker still serves
            await _until(lambda: sid in node.answers)
            assert node.answers[sid][0].type is FrameType.RESPONSE
            await _until(lambda: node.held() == CAPACITY)
        finally:
            await rt.stop()
            server.close()

    run_uvloop(main)


@pytest.mark.parametrize("bad", ["repeated_request", "unknown_model_then_cancel"])
def test_a_bad_frame_right_after_a_request_returns_the_slot(bad: str) -> None:
    """A frame the worker resets the stream for, in the same write as the REQUEST it follows."""
    slow = RequestMeta("echo", params={"delay-ms": 50})

    async def main() -> None:
        node, server, rt, _ = await _started()
        try:
            assert node.link is not None
            for _ in range(3 * CAPACITY):
                await _until(lambda: node.held() > 0)  # a slot must have come back for the next one
                if bad == "repeated_request":
                    # A REQUEST again on the still-open id (a misbehaving peer: our own core would refuse
                    # to send it, so its bytes go out raw behind the first): STREAM_STATE, a stream reset.
                    (sid,) = node.write_together(lambda sid: [Frame(FrameType.REQUEST, sid, slow, b"x", FLAG_END)])
                    again = Frame(FrameType.REQUEST, sid, slow, b"x", FLAG_END)
                    node.link._write(encode_frame(again))  # the link's byte path, not its core
                else:
                    node.write_together(
                        lambda sid: [
                            Frame(FrameType.REQUEST, sid, RequestMeta("no-such-model"), b"x"),
                            Frame(FrameType.CANCEL, sid, CancelMeta(ErrorCode.CANCELLED, "")),
                        ]
                    )
            await _until(lambda: node.held() == CAPACITY and rt.active == 0)
        finally:
            await rt.stop()
            server.close()

    run_uvloop(main)
