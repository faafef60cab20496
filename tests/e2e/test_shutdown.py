"""A role that stops says so (SPEC §6.5): its peers read GOAWAY(NO_ERROR), then SHUTTING_DOWN on each
stream still open (retryable elsewhere), then the end of the connection; never a bare EOF. Loopback,
under uvloop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from casola.net.handshake import dial_tcp
from casola.net.link import LinkBase
from casola.wire import FLAG_END, ErrorCode, ErrorMeta, Event, Frame, FrameType, GoAwayMeta, HelloMeta, RequestMeta
from tests.e2e.stack import HttpClient, Stack, run_uvloop

SLOW = {"delay-ms": 10_000}


class Recorder:
    """A raw link's events, in order, and when it ended."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lost = asyncio.get_running_loop().create_future()

    def on_events(self, link: LinkBase, events: list[Event]) -> None:
        self.events.extend(events)

    def on_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def kinds(self) -> list[tuple[FrameType, int, int]]:
        """(type, stream, code) of the GOAWAY and ERROR frames received."""
        out = []
        for ev in self.events:
            if isinstance(ev, Frame) and isinstance(ev.meta, GoAwayMeta | ErrorMeta):
                out.append((ev.type, ev.stream_id, ev.meta.code))
        return out


async def _slow_stream(rec: Recorder, port: int, hello: HelloMeta) -> tuple[LinkBase, int]:
    link = await dial_tcp("127.0.0.1", port, hello, rec.on_events, rec.on_lost)
    sid = link.conn.next_stream_id()
    link.send(Frame(FrameType.REQUEST, sid, RequestMeta("echo", params=SLOW), b"x", FLAG_END))
    await asyncio.sleep(0.2)  # dispatched to the worker, which sleeps
    return link, sid


def test_a_stopping_ingress_tells_its_frame_clients(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        rec = Recorder()
        try:
            _, sid = await _slow_stream(rec, stack.frames_port, HelloMeta("client", credential=stack.api_key))
            await stack.ingress.stop()
            await asyncio.wait_for(rec.lost, 5)
            assert rec.kinds() == [
                (FrameType.GOAWAY, 0, ErrorCode.NO_ERROR),
                (FrameType.ERROR, sid, ErrorCode.SHUTTING_DOWN),
            ]
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_stopping_queue_node_tells_ingresses_and_http_clients(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        rec = Recorder()
        key = stack.keys.ensure_key("ingress-key", "_system", ["ingress"], "tests")
        http = await HttpClient.connect(stack.http_port)
        try:
            _, sid = await _slow_stream(rec, stack.node.port, HelloMeta("ingress", credential=key, node_id="raw"))
            auth = {"Authorization": f"Bearer {stack.api_key}", "X-Casola-Param-Delay-Ms": "10000"}
            await http.send("POST", "/v1/run/echo", b"x", auth)
            await asyncio.sleep(0.2)
            await stack.node.stop()
            await asyncio.wait_for(rec.lost, 5)
            assert rec.kinds() == [
                (FrameType.GOAWAY, 0, ErrorCode.NO_ERROR),
                (FrameType.ERROR, sid, ErrorCode.SHUTTING_DOWN),
            ]
            r = await asyncio.wait_for(http.read_response(), 5)
            assert r.status == 503 and r.headers.get("retry-after")  # retryable, not a 502
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_a_stopping_worker_tells_its_queue_node(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt, echo = await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            auth = {"Authorization": f"Bearer {stack.api_key}", "X-Casola-Param-Delay-Ms": "10000"}
            await http.send("POST", "/v1/run/echo", b"x", auth)
            await asyncio.sleep(0.2)
            assert echo.started == 1
            await rt.stop()  # no drain: the running request ends as SHUTTING_DOWN, retryable
            r = await asyncio.wait_for(http.read_response(), 5)
            assert r.status == 503 and r.headers.get("retry-after")
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)
