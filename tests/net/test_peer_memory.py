"""What an unauthenticated or broken peer costs the node (DESIGN "Auth and tenancy": nothing is
allocated for a peer before it has authenticated beyond a small fixed bound), and that a closed
connection's memory is freed at once, not at the next full garbage collection."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import Iterator

import msgspec
import pytest

from casola.net.handshake import Refused, serve_tcp
from casola.net.link import LinkBase
from casola.net.protocol import FrameProtocol
from casola.wire import (
    HEAD,
    Connection,
    ErrorCode,
    Frame,
    FrameType,
    HelloAckMeta,
    HelloMeta,
    RequestMeta,
    encode_frame,
)
from casola.wire.decoder import FIRST_RX
from tests.net.test_protocol_loopback import LOOPS, run

MIB = 1024 * 1024


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting frees memory here: what a cycle keeps stays kept."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _hello(role: str = "client") -> bytes:
    return b"".join(bytes(b) for b in encode_frame(Frame(FrameType.HELLO, meta=HelloMeta(role, credit=8))))


def _announce(size: int) -> bytes:
    """A REQUEST header (and its metadata) announcing a `size`-byte payload that never comes."""
    meta = msgspec.msgpack.encode(RequestMeta("echo"))
    return HEAD.pack(1, FrameType.REQUEST, 0, 1, len(meta), size) + meta


class Acceptor:
    """serve_tcp whose role keeps a weak reference to every link it accepted."""

    def __init__(self, refuse: bool = False) -> None:
        self.links: list[weakref.ref[LinkBase]] = []
        self.refuse = refuse

    def on_hello(self, link: LinkBase, frame: Frame) -> None:
        self.links.append(weakref.ref(link))
        if self.refuse:
            raise Refused(ErrorCode.UNAUTHENTICATED, "no")
        link.send(Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(link.conn.version, credit=8)))


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 5)  # until EOF: the server ended it


@pytest.mark.parametrize("kind", LOOPS)
def test_a_payload_announced_before_hello_is_refused_at_its_header(kind: str) -> None:
    """The 33 bytes of a REQUEST header announcing 16 MiB get GOAWAY(BAD_STATE) at once; before, the
    node allocated the 16 MiB and waited for them."""

    async def main() -> None:
        acc = Acceptor()
        server = await serve_tcp("127.0.0.1", 0, acc.on_hello)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_announce(16 * MIB))
            data = await _closed_by_server(reader)
            _, ftype, *_ = HEAD.unpack_from(data)
            assert ftype == FrameType.GOAWAY and b"before the handshake" in data
            writer.close()
            assert acc.links == []  # the role never heard of it
        finally:
            server.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("junk", ["bad_type", "pipelined_request", "after_ack"])
def test_a_closed_connection_is_freed_without_a_collection(kind: str, junk: str, no_gc: None) -> None:
    """The connection, its link and its buffers go with the last reference: no cycle through a
    stored exception's traceback keeps them until a full collection."""

    async def main() -> None:
        acc = Acceptor()
        server = await serve_tcp("127.0.0.1", 0, acc.on_hello)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if junk == "after_ack":
                writer.write(_hello())
                await reader.readexactly(HEAD.size)  # the HELLO_ACK's head
                await asyncio.sleep(0.05)
                writer.write(b"\x01\xee" + bytes(18))
            elif junk == "bad_type":
                writer.write(_hello() + b"\x01\xee" + bytes(18))
            else:
                req = encode_frame(Frame(FrameType.REQUEST, 1, RequestMeta("echo"), b"x", 1))
                writer.write(_hello() + b"".join(bytes(b) for b in req))
            await _closed_by_server(reader)
            writer.close()
            await asyncio.sleep(0.1)  # the loop's own callbacks let go of the transport
        finally:
            server.close()
            await server.wait_closed()
        assert all(ref() is None for ref in acc.links), "a closed link is still alive"
        assert _live(FrameProtocol) == 0 and _live(Connection) == 0  # whether or not a role saw it

    run(kind, main)


def _live(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, cls))


@pytest.mark.parametrize("kind", LOOPS)
def test_junk_after_hello_is_one_log_line_not_a_traceback(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        acc = Acceptor()
        server = await serve_tcp("127.0.0.1", 0, acc.on_hello)
        port = server.sockets[0].getsockname()[1]
        try:
            for payload in (_hello() + b"\x01\xee" + bytes(18), _hello() + _announce(100)):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(payload)
                await _closed_by_server(reader)
                writer.close()
        finally:
            server.close()

    with caplog.at_level(logging.INFO):
        run(kind, main)
    lines = [r for r in caplog.records if r.name.startswith("casola")]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines), [r.getMessage() for r in lines]
    assert all("ended" in r.getMessage() for r in lines)


def test_refusals_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        server = await serve_tcp("127.0.0.1", 0, Acceptor(refuse=True).on_hello)
        port = server.sockets[0].getsockname()[1]
        try:
            for _ in range(40):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(_hello())
                await _closed_by_server(reader)
                writer.close()
        finally:
            server.close()

    with caplog.at_level(logging.INFO):
        run("asyncio", main)
    refused = [r for r in caplog.records if "refused connection" in r.getMessage()]
    assert 1 <= len(refused) <= 10  # a burst of 5, then about 5 a second: not one line per connection


def test_the_first_receive_buffer_is_small() -> None:
    """What an acceptor holds for a connection until its HELLO is answered (SPEC §2.3 check 7)."""
    from casola.wire import Side

    conn = Connection(Side.ACCEPTOR, 0.0)
    assert len(conn.writable()) == FIRST_RX
    big_hello = Frame(FrameType.HELLO, meta=HelloMeta("worker", credit=8, models=["m" * 50] * 150))
    raw = b"".join(bytes(b) for b in encode_frame(big_hello))
    assert len(raw) > FIRST_RX
    (got,) = conn.receive_data(raw, 0.0)  # a large HELLO still fits: the buffer grows, once
    assert got.meta == big_hello.meta
