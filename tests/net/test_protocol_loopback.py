"""FrameProtocol over real loopback sockets, under asyncio and uvloop: handshake, echo 0 B..8 MiB."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from casola.net.errors import ConnectionLost
from casola.net.gate import WriteGate
from casola.net.protocol import FrameProtocol
from casola.wire import (
    FLAG_END,
    Connection,
    Event,
    Frame,
    FrameType,
    HelloAckMeta,
    HelloMeta,
    RequestMeta,
    Side,
)
from tests.require import need_module

LOOPS = ["asyncio", "uvloop"]


def run(kind: str, main: Callable[[], Awaitable[Any]]) -> Any:
    if kind == "uvloop":
        uvloop = need_module("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        loop.close()


class EchoServer:
    """The acceptor: answer HELLO, echo every request back as RESPONSE, DATA per chunk, END."""

    def __init__(self) -> None:
        self.bodies: dict[int, list[Any]] = defaultdict(list)

    def on_events(self, proto: FrameProtocol, events: list[Event]) -> None:
        for ev in events:
            if not isinstance(ev, Frame):
                continue
            if ev.type is FrameType.HELLO:
                proto.send(Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(proto.conn.version, credit=64)))
            elif ev.type in (FrameType.REQUEST, FrameType.DATA):
                if ev.payload:
                    self.bodies[ev.stream_id].append(ev.payload)  # the received buffers themselves
                if ev.end:
                    self.answer(proto, ev.stream_id)

    def answer(self, proto: FrameProtocol, sid: int) -> None:
        proto.conn.send(Frame(FrameType.RESPONSE, sid))
        for chunk in self.bodies.pop(sid, []):
            proto.conn.send(Frame(FrameType.DATA, sid, None, chunk))
        proto.send(Frame(FrameType.END, sid))


async def echo_server() -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FrameProtocol(Connection(Side.ACCEPTOR, loop.time()), EchoServer().on_events), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


class Client:
    """A dialer that collects each stream's answer."""

    def __init__(self) -> None:
        self.ready = asyncio.get_running_loop().create_future()
        self.done: dict[int, asyncio.Future[bytes]] = {}
        self.chunks: dict[int, list[bytes]] = defaultdict(list)

    def on_events(self, proto: FrameProtocol, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, Frame) and ev.type is FrameType.HELLO_ACK:
                self.ready.set_result(None)
            elif isinstance(ev, Frame) and ev.type in (FrameType.RESPONSE, FrameType.DATA, FrameType.END):
                if ev.payload:
                    self.chunks[ev.stream_id].append(bytes(ev.payload))
                if ev.end:
                    self.done[ev.stream_id].set_result(b"".join(self.chunks.pop(ev.stream_id, [])))

    async def connect(self, port: int) -> FrameProtocol:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(
            lambda: FrameProtocol(Connection(Side.DIALER, loop.time()), self.on_events), "127.0.0.1", port
        )
        proto.send(Frame(FrameType.HELLO, meta=HelloMeta("client", credit=0)))
        await self.ready
        return proto

    async def call(self, proto: FrameProtocol, payload: bytes) -> bytes:
        sid = proto.conn.next_stream_id()
        self.done[sid] = asyncio.get_running_loop().create_future()
        proto.send(Frame(FrameType.REQUEST, sid, RequestMeta("echo"), payload, FLAG_END))
        await proto.drain()
        return await self.done[sid]


@pytest.mark.parametrize("kind", LOOPS)
def test_echo_round_trips_are_byte_identical(kind: str) -> None:
    sizes = [0, 1, 1023, 16 * 1024, 64 * 1024 + 7, 1 << 20, 8 << 20]

    async def main() -> None:
        server, port = await echo_server()
        client = Client()
        proto = await client.connect(port)
        for size in sizes:
            payload = bytes((i * 7) & 0xFF for i in range(min(size, 4096))) * (size // 4096 + 1)
            payload = payload[:size]
            assert await client.call(proto, payload) == payload
        answers = await asyncio.gather(*(client.call(proto, bytes([n]) * 100) for n in range(10)))
        assert answers == [bytes([n]) * 100 for n in range(10)]  # multiplexed on one connection
        proto.close()
        await proto.closed
        server.close()
        await server.wait_closed()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_garbage_gets_goaway_and_close(kind: str) -> None:
    async def main() -> None:
        server, port = await echo_server()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x07" + bytes(19))  # version 7
        data = await reader.read()  # the server answers GOAWAY(BAD_VERSION) and closes
        assert data[1] == FrameType.GOAWAY
        writer.close()
        server.close()
        await server.wait_closed()

    run(kind, main)


def test_write_gate_wakes_every_waiter_and_fails_them_on_loss() -> None:
    async def main() -> None:
        gate = WriteGate()
        await gate.wait()  # open: returns at once
        gate.pause()
        waiters = [asyncio.ensure_future(gate.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        gate.resume()
        await asyncio.gather(*waiters)
        gate.pause()
        stuck = asyncio.ensure_future(gate.wait())
        await asyncio.sleep(0)
        gate.fail(ConnectionLost("gone"))
        with pytest.raises(ConnectionLost):
            await stuck
        with pytest.raises(ConnectionLost):
            await gate.wait()

    run("asyncio", main)
