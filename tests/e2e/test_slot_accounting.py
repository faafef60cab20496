"""Every worker slot comes back, whatever the clients do (DESIGN "No client can hurt another").

A Hypothesis state machine drives a real queue node and a real worker runtime over loopback TCP.
Its clients are ingress-role links to the queue node that send any interleaving of REQUEST (with
or without its body), DATA, END, CANCEL, frames out of turn (the node resets those streams), their
own disconnects and drops of the worker's link. Whenever the system is idle again, the worker's
credit at the queue node, the registry's free slots and `/healthz` all equal its capacity.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import uvloop  # a dependency (setup.cfg): never skipped
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from casola.net.handshake import dial_tcp
from casola.net.link import LinkBase
from casola.wire import (
    FLAG_END,
    CancelMeta,
    ErrorCode,
    Event,
    Frame,
    FrameType,
    HelloMeta,
    RequestMeta,
    StreamReset,
    encode_frame,
)
from tests.e2e.stack import HttpClient, Stack

CAPACITY = 4


class _Client:
    """One ingress-role link to the queue node and the streams it has open (sid -> request open?)."""

    def __init__(self) -> None:
        self.link: LinkBase | None = None
        self.open: dict[int, bool] = {}

    def on_events(self, link: LinkBase, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, Frame) and ev.stream_id and (ev.end or ev.type is FrameType.ERROR):
                self.open.pop(ev.stream_id, None)
            elif isinstance(ev, StreamReset):
                self.open.pop(ev.stream_id, None)

    def on_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        self.open.clear()


class SlotAccounting(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        self.tmp = tempfile.TemporaryDirectory()
        self.stack = self.run(Stack(Path(self.tmp.name)).start())
        self.runtime, _ = self.run(self.stack.add_worker(capacity=CAPACITY))
        self.ingress_key = self.stack.keys.ensure_key("ingress-key", "_system", ["ingress"], "tests")
        self.clients = [_Client(), _Client()]
        for c in self.clients:
            self.run(self._dial(c))

    def run(self, coro: Any) -> Any:
        return self.runner.run(asyncio.wait_for(coro, 30))

    async def _dial(self, client: _Client) -> None:
        host, _, port = self.stack.queue_addr.rpartition(":")
        hello = HelloMeta("ingress", credential=self.ingress_key, node_id="prop-client")
        client.link = await dial_tcp(host, int(port), hello, client.on_events, client.on_lost)

    def _streams(self, want_open_request: bool | None = None) -> list[tuple[_Client, int]]:
        return [
            (c, sid)
            for c in self.clients
            for sid, req_open in sorted(c.open.items())
            if want_open_request is None or req_open == want_open_request
        ]

    # -- what clients do ---------------------------------------------------------------------------

    @rule(
        which=st.integers(0, 1),
        delay=st.sampled_from([0, 0, 5, 30]),
        chunks=st.integers(1, 3),
        head_first=st.booleans(),
        fail=st.booleans(),
        whole=st.booleans(),
    )
    def request(self, which: int, delay: int, chunks: int, head_first: bool, fail: bool, whole: bool) -> None:
        client = self.clients[which]
        link = client.link
        if link is None or not link.is_up or link.conn.send_credit <= 0:
            return
        params: dict[str, Any] = {"delay-ms": delay, "chunks": chunks, "head-first": head_first}
        if fail:
            params["fail"] = "asked to fail"
        sid = link.conn.next_stream_id()
        link.send(Frame(FrameType.REQUEST, sid, RequestMeta("echo", params=params), b"in", FLAG_END if whole else 0))
        client.open[sid] = not whole

    @precondition(lambda self: self._streams(True))
    @rule(pick=st.integers(0, 99), end=st.booleans())
    def data(self, pick: int, end: bool) -> None:
        streams = self._streams(True)
        client, sid = streams[pick % len(streams)]
        assert client.link is not None
        if client.link.conn.is_open(sid):
            client.link.send(Frame(FrameType.DATA, sid, None, b"more", FLAG_END if end else 0))
            client.open[sid] = not end

    @precondition(lambda self: self._streams())
    @rule(pick=st.integers(0, 99))
    def cancel(self, pick: int) -> None:
        streams = self._streams()
        client, sid = streams[pick % len(streams)]
        assert client.link is not None
        if client.link.conn.is_open(sid):
            client.link.conn.reset(sid, ErrorCode.CANCELLED, "client gave up")
            client.link.flush()
        client.open.pop(sid, None)

    @precondition(lambda self: self._streams())
    @rule(pick=st.integers(0, 99))
    def out_of_turn(self, pick: int) -> None:
        """A REQUEST again on a stream that is open: the queue node resets that stream (STREAM_STATE)."""
        streams = self._streams()
        client, sid = streams[pick % len(streams)]
        assert client.link is not None
        again = Frame(FrameType.REQUEST, sid, RequestMeta("echo"), b"x", FLAG_END)
        client.link._write(encode_frame(again))  # raw bytes: our own core would refuse to send it

    @rule(which=st.integers(0, 1))
    def disconnect(self, which: int) -> None:
        client = self.clients[which]
        if client.link is not None:
            client.link.close()
        client.open.clear()
        self.run(self._dial(client))

    @rule()
    def drop_worker_link(self) -> None:
        for w in list(self.stack.node.registry.workers):
            w.link.close()

    @rule(ms=st.sampled_from([0, 1, 10, 40]))
    def pause(self, ms: int) -> None:
        self.run(asyncio.sleep(ms / 1000))

    # -- what must hold ----------------------------------------------------------------------------

    @invariant()
    def never_more_than_capacity(self) -> None:
        assert self.runtime.active <= CAPACITY
        for w in self.stack.node.registry.workers:
            assert 0 <= w.free <= CAPACITY

    def teardown(self) -> None:
        try:
            self.run(self._settle_and_check())
        finally:
            self.run(self.stack.stop())
            self.runner.close()
            self.tmp.cleanup()

    async def _settle_and_check(self) -> None:
        for c in self.clients:
            for sid, req_open in list(c.open.items()):  # finish what is left: the request bodies end
                if c.link is not None and req_open and c.link.conn.is_open(sid):
                    c.link.send(Frame(FrameType.END, sid))
        loop = asyncio.get_running_loop()
        end = loop.time() + 15
        node = self.stack.node
        while True:
            workers = node.registry.workers
            idle = (
                self.runtime.active == 0
                and len(workers) == 1
                and not workers[0].calls
                and not any(c.open for c in self.clients)
            )
            if idle and workers[0].free == CAPACITY:
                break
            if loop.time() > end:
                raise AssertionError(
                    f"not idle: active={self.runtime.active} workers={len(workers)}"
                    f" free={[w.free for w in workers]} calls={[len(w.calls) for w in workers]}"
                    f" open={[c.open for c in self.clients]}"
                )
            await asyncio.sleep(0.01)
        assert node.registry.snapshot()["echo"]["free"] == CAPACITY
        http = await HttpClient.connect(self.stack.http_port)
        try:
            r = await http.request("GET", "/healthz")
        finally:
            await http.close()
        health = msgspec.json.decode(r.body)
        assert health["models"]["echo"]["free"] == health["models"]["echo"]["slots"] == CAPACITY


SlotAccounting.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_every_slot_comes_back = SlotAccounting.TestCase


def test_a_thousand_clients_that_disconnect_at_once_leave_every_slot_free(tmp_path: Path) -> None:
    """Each client sends its request and closes at once (wrk and h2load do at the end of a run; a
    client timing out does): the REQUEST and its CANCEL reach the worker together, often in one read."""

    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt, echo = await stack.add_worker(capacity=64)
        key = stack.api_key

        hello = b"".join(
            bytes(b) for b in encode_frame(Frame(FrameType.HELLO, meta=HelloMeta("client", credential=key)))
        )

        async def hit_and_run(i: int) -> None:
            """Odd ones over HTTP, even ones over raw frames (REQUEST and CANCEL in one write)."""
            if i % 2:
                _, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
                body = b"x" * (i % 7)
                writer.write(
                    f"POST /v1/run/echo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
                    f"X-Casola-Param-Delay-Ms: {i % 3 * 20}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", stack.frames_port)
                writer.write(hello)
                await reader.readexactly(20)  # HELLO_ACK's head: the stream may open now
                meta = RequestMeta("echo", params={"delay-ms": i % 3 * 20})
                frames = [Frame(FrameType.REQUEST, 1, meta, b"x", FLAG_END), Frame(FrameType.CANCEL, 1, CancelMeta())]
                writer.write(b"".join(bytes(b) for f in frames for b in encode_frame(f)))
            writer.close()

        try:
            for batch in range(10):
                await asyncio.gather(*(hit_and_run(batch * 100 + i) for i in range(100)))
            loop = asyncio.get_running_loop()
            end = loop.time() + 15
            while rt.active or stack.node.registry.snapshot()["echo"]["free"] != 64:
                assert loop.time() < end, (rt.active, stack.node.registry.snapshot())
                await asyncio.sleep(0.02)
            http = await HttpClient.connect(stack.http_port)
            try:
                health = msgspec.json.decode((await http.request("GET", "/healthz")).body)
                r = await http.request("POST", "/v1/run/echo", b"still served", {"Authorization": f"Bearer {key}"})
            finally:
                await http.close()
            echo_health = health["models"]["echo"]
            print(f"1,000 disconnecting clients: handler started {echo.started}, cancelled {rt.cancelled};"
                  f" /healthz free {echo_health['free']} of {echo_health['slots']}")  # fmt: skip
            assert echo_health["free"] == echo_health["slots"] == 64
            assert (r.status, r.body) == (200, b"still served")
        finally:
            await stack.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 60))
