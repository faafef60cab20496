"""WebSocket upgrades on HttpProtocol and the `WebSocket` adapter, over real loopback sockets under asyncio
and uvloop: the opening handshake (RFC 6455 §4), the hand-over of bytes that came with the head, refusals
before the 101, keep-alive pings and their timeout, close codes, the message size limit, protocol errors.
The client side is written by hand with wsproto's client frame layer, so every byte is the test's own."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Callable
from typing import Any

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Message, Ping, Pong, TextMessage

from casola.ingress.http import Exchange, HttpLimits
from casola.ingress.websocket import (
    BINARY,
    TEXT,
    HandshakeError,
    WebSocket,
    WsLimits,
    accept,
    check_handshake,
)
from tests.ingress.test_http import LOOPS, Client, run, serving

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


class EchoApp:
    """Echoes every message; records what the adapter told it."""

    def __init__(self) -> None:
        self.ws: WebSocket | None = None
        self.opened = 0
        self.messages: list[tuple[int, bytes]] = []
        self.closed: list[tuple[int, str, bool]] = []

    def ws_opened(self) -> None:
        self.opened += 1

    def ws_message(self, opcode: int, data: bytes) -> None:
        self.messages.append((opcode, data))
        assert self.ws is not None
        self.ws.send(opcode, data)

    def ws_closed(self, code: int, reason: str, by_peer: bool) -> None:
        self.closed.append((code, reason, by_peer))


DEFAULT = WsLimits()


def ws_server(apps: list[EchoApp], limits: WsLimits = DEFAULT, *, defer: bool = False) -> Callable[[Exchange], None]:
    """A handler that accepts every valid WebSocket upgrade (later, with `defer`), refuses bad handshakes,
    and answers 200 to everything else."""

    def handler(ex: Exchange) -> None:
        if not ex.upgrade:
            ex.respond(200, [], b"plain")
            return
        try:
            token = check_handshake(ex)
        except HandshakeError as exc:
            ex.send_error(exc.status, exc.message, "invalid_request_error", "bad_handshake", None, exc.headers)
            return
        app = EchoApp()
        app.ws = WebSocket(app, limits)
        apps.append(app)
        if defer:
            asyncio.get_running_loop().call_later(0.05, accept, ex, app.ws, token)
        else:
            assert accept(ex, app.ws, token)

    return handler


def handshake(key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==", extra: bytes = b"", version: bytes = b"13") -> bytes:
    return (
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: " + version + b"\r\n" + extra + b"\r\n"
    )


class WsClient:
    """A raw client: wsproto's client frame layer over the test's `Client`."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.ws = Connection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    def frame(self, event: Event) -> bytes:
        return self.ws.send(event)

    async def send(self, event: Event) -> None:
        await self.c.send(self.ws.send(event))

    async def next(self, timeout: float = 5.0) -> Event:
        """The next whole event (message fragments joined)."""
        parts: list[Any] = []
        while True:
            while self.events:
                ev = self.events.pop(0)
                if isinstance(ev, Message):
                    parts.append(ev.data)
                    if not ev.message_finished:
                        continue
                    data = "".join(parts) if isinstance(ev, TextMessage) else b"".join(parts)
                    return type(ev)(data=data)
                return ev
            data = await asyncio.wait_for(self.c.r.read(65536), timeout)
            if not data:
                raise EOFError
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())


async def open_ws(port: int, first: bytes = b"", extra: bytes = b"") -> tuple[WsClient, bytes]:
    """Connect, send the handshake (and `first` in the same write), read the 101 head."""
    c = await Client.open(port)
    await c.send(handshake(extra=extra) + first)
    head = await c.head()
    return WsClient(c), head


def _accept_value(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


@pytest.mark.parametrize("kind", LOOPS)
def test_handshake_and_bytes_sent_with_the_head_are_handed_over(kind: str) -> None:
    apps: list[EchoApp] = []

    async def main() -> None:
        async with serving(ws_server(apps)) as srv:
            pre = Connection(ConnectionType.CLIENT)
            first = pre.send(BytesMessage(data=b"\x00first")) + pre.send(TextMessage(data="second"))
            # permessage-deflate offered: never accepted (audio)
            client, head = await open_ws(srv.port, first, b"Sec-WebSocket-Extensions: permessage-deflate\r\n")
            client.ws = pre
            assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            lower = head.lower()
            assert b"upgrade: websocket\r\n" in lower and b"connection: upgrade\r\n" in lower
            assert b"sec-websocket-accept: " + _accept_value(b"dGhlIHNhbXBsZSBub25jZQ==").lower() in lower
            assert b"s3pplmbitxaq9kygzzhzrbk+xoo=" in lower  # RFC 6455 §1.3's own example
            assert b"extension" not in lower and b"content-length" not in lower
            assert await client.next() == BytesMessage(data=b"\x00first")
            assert await client.next() == TextMessage(data="second")
            big = os.urandom(200_000)
            await client.send(BytesMessage(data=big))
            assert await client.next() == BytesMessage(data=big)
            await client.send(CloseConnection(code=1000, reason="bye"))
            assert await client.next() == CloseConnection(code=1000, reason="bye")
            assert await client.c.at_eof()  # the server closes the TCP connection first (RFC 6455 §7.1.1)
        (app,) = apps
        assert app.opened == 1
        assert app.messages == [(BINARY, b"\x00first"), (TEXT, b"second"), (BINARY, big)]
        assert app.closed == [(1000, "bye", True)]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_an_accept_decided_later_gets_the_bytes_that_came_meanwhile(kind: str) -> None:
    apps: list[EchoApp] = []

    async def main() -> None:
        async with serving(ws_server(apps, defer=True)) as srv:
            pre = Connection(ConnectionType.CLIENT)
            c = await Client.open(srv.port)
            await c.send(handshake() + pre.send(TextMessage(data="a")))
            await asyncio.sleep(0.01)
            await c.send(pre.send(TextMessage(data="b")))  # before the app has decided
            assert (await c.head()).startswith(b"HTTP/1.1 101 ")
            client = WsClient(c)
            client.ws = pre
            assert [await client.next(), await client.next()] == [TextMessage(data="a"), TextMessage(data="b")]
            await c.close()
        await asyncio.sleep(0.05)
        assert apps[0].closed == [(1006, "the connection was lost", False)]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_refused_upgrade_is_an_ordinary_answer_then_close(kind: str) -> None:
    def refuse(ex: Exchange) -> None:
        assert ex.upgrade == b"websocket"
        ex.send_error(401, "no key", "authentication_error", "missing_api_key")

    async def main() -> None:
        async with serving(refuse) as srv:
            c = await Client.open(srv.port)
            await c.send(handshake() + b"\x81\x85garbage-that-is-not-http")
            resp = await c.response()
            assert resp.status == 401 and resp.error()["code"] == "missing_api_key"
            assert resp.header(b"connection") == b"close"
            assert await c.at_eof()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_bad_handshakes_are_refused_before_the_101(kind: str) -> None:
    apps: list[EchoApp] = []

    async def main() -> None:
        async with serving(ws_server(apps)) as srv:
            for data, status in [
                (handshake(version=b"8"), 426),
                (handshake(key=b"c2hvcnQ="), 400),  # 5 bytes, not 16
                (handshake(key=b"not base64!!!!!!!!!!!!=="), 400),
            ]:
                c = await Client.open(srv.port)
                await c.send(data)
                resp = await c.response()
                assert resp.status == status, data
                if status == 426:
                    assert resp.header(b"sec-websocket-version") == b"13"
                assert await c.at_eof()
            # the same app still answers plain requests, keep-alive
            c = await Client.open(srv.port)
            for _ in range(2):
                await c.send(b"GET /ws HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await c.response()).body == b"plain"
            await c.close()
        assert apps == []

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_server_pings_and_closes_1011_when_no_pong_comes(kind: str) -> None:
    apps: list[EchoApp] = []
    limits = WsLimits(ping_interval=0.1, ping_timeout=0.2)

    async def main() -> None:
        async with serving(ws_server(apps, limits)) as srv:
            client, _ = await open_ws(srv.port)
            ping = await client.next()
            assert isinstance(ping, Ping) and len(ping.payload) == 4
            await client.c.send(client.frame(Pong(payload=ping.payload)))  # answered: nothing happens
            ping2 = await client.next()
            assert isinstance(ping2, Ping) and ping2.payload != ping.payload
            t0 = asyncio.get_running_loop().time()
            close = await client.next()  # not answered: closed 0.2 s after that ping
            assert close == CloseConnection(code=1011, reason="keepalive ping timeout")
            assert 0.15 < asyncio.get_running_loop().time() - t0 < 1.0
            assert await client.c.at_eof()  # our Close was not answered: closed without it
        assert apps[0].closed == [(1011, "keepalive ping timeout", False)]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_client_ping_gets_pong_and_close_without_code(kind: str) -> None:
    apps: list[EchoApp] = []

    async def main() -> None:
        async with serving(ws_server(apps)) as srv:
            client, _ = await open_ws(srv.port)
            await client.send(Ping(payload=b"abc"))
            assert await client.next() == Pong(payload=b"abc")
            await client.c.send(b"\x88\x80" + os.urandom(4))  # a masked Close without a code
            ev = await client.next()
            assert isinstance(ev, CloseConnection) and ev.code == 1005
            assert await client.c.at_eof()
        assert apps[0].closed == [(1005, "", True)]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("text", [False, True])
def test_a_message_over_max_message_closes_1009(kind: str, text: bool) -> None:
    apps: list[EchoApp] = []
    limits = WsLimits(max_message=1000, ping_interval=0)

    async def main() -> None:
        async with serving(ws_server(apps, limits)) as srv:
            client, _ = await open_ws(srv.port)
            ok: Message[Any] = TextMessage(data="é" * 500) if text else BytesMessage(data=b"x" * 1000)  # 1000 bytes
            await client.send(ok)
            assert await client.next() == ok
            # 1001 bytes in three fragments: refused on the last one, whatever the frames
            kind_ = TextMessage if text else BytesMessage
            for part, fin in ((500, False), (500, False), (1, True)):
                data: Any = "a" * part if text else b"a" * part
                await client.send(kind_(data=data, message_finished=fin))
            close = await client.next()
            assert close == CloseConnection(code=1009, reason="a message is limited to 1000 bytes")
            await client.send(close.response())
            assert await client.c.at_eof()
        assert apps[0].closed == [(1009, "a message is limited to 1000 bytes", False)]
        assert len(apps[0].messages) == 1

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x81\x02hi", 1002),  # unmasked: a client must mask (RFC 6455 §5.1)
        (b"\x81\x82\x00\x00\x00\x00\xff\xfe", 1007),  # text that is not UTF-8
        (b"\x83\x80\x00\x00\x00\x00", 1002),  # reserved opcode
    ],
)
def test_protocol_errors_close_with_their_code(kind: str, frame: bytes, code: int) -> None:
    apps: list[EchoApp] = []

    async def main() -> None:
        async with serving(ws_server(apps)) as srv:
            client, _ = await open_ws(srv.port)
            await client.c.send(frame)
            ev = await client.next()
            assert isinstance(ev, CloseConnection) and ev.code == code
            assert await client.c.at_eof()
        assert apps[0].closed[0][0] == code and apps[0].closed[0][2] is False
        assert apps[0].messages == []

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_app_close_waits_for_the_answer_and_drops_later_messages(kind: str) -> None:
    apps: list[EchoApp] = []

    async def main() -> None:
        async with serving(ws_server(apps)) as srv:
            client, _ = await open_ws(srv.port)
            await client.send(TextMessage(data="one"))
            assert await client.next() == TextMessage(data="one")
            ws = apps[0].ws
            assert ws is not None and ws.is_open
            ws.close(1013, "try later")
            assert not ws.is_open and not ws.send(TEXT, b"dropped")
            await client.send(TextMessage(data="late"))  # after the server's Close: dropped
            assert await client.next() == CloseConnection(code=1013, reason="try later")
            await client.send(CloseConnection(code=1013))
            assert await client.c.at_eof()
        assert apps[0].closed == [(1013, "try later", False)]
        assert [m for _, m in apps[0].messages] == [b"one"]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_client_that_reads_nothing_is_dropped_past_max_unread(kind: str) -> None:
    apps: list[EchoApp] = []
    limits = WsLimits(max_unread=256 * 1024, ping_interval=0)

    async def main() -> None:
        async with serving(ws_server(apps, limits), HttpLimits(write_high=64 * 1024, write_low=16 * 1024)) as srv:
            client, _ = await open_ws(srv.port)
            ws = apps[0].ws if apps else None
            for _ in range(100):
                if apps:
                    break
                await asyncio.sleep(0.01)
            ws = apps[0].ws
            assert ws is not None
            chunk = b"z" * 65536
            peak, sent = 0, 0
            while ws.send(BINARY, chunk):  # the client reads nothing
                sent += 1
                peak = max(peak, ws.write_buffered)
                assert sent < 2000, "never dropped"
                await asyncio.sleep(0)
            assert peak <= 256 * 1024 + 65536 + 10  # bounded: the limit, plus the one message that crossed it
            assert apps[0].closed == [(1006, "the client left more than 262144 bytes unread", False)]
            await client.c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_non_websocket_upgrades_are_still_refused(kind: str) -> None:
    apps: list[EchoApp] = []

    async def main() -> None:
        async with serving(ws_server(apps)) as srv:
            for data in [
                b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
                b"GET / HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 3\r\n\r\nabc",
            ]:
                c = await Client.open(srv.port)
                await c.send(data)
                resp = await c.response()
                assert resp.status == 400 and resp.error()["code"] == "bad_request", data
                assert await c.at_eof()
        assert apps == []

    run(kind, main)
