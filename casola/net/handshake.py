"""Opening links: dial (send HELLO, wait for HELLO_ACK) and accept (route HELLO to the role).

The same two functions serve TCP and the in-memory link, so a role's handshake code is one path.
The acceptor's role gets `on_hello(link, frame)`: it checks the credential and either sends
HELLO_ACK and installs its own `on_events`/`on_lost` on the link, or raises `Refused` (the link then
sends GOAWAY with the code and closes). SPEC §6.1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import Any

from casola.net.errors import ConnectionLost, RateLimitedLog
from casola.net.link import EventHandler, LinkBase, LostHandler
from casola.net.memlink import memory_pair
from casola.net.protocol import FrameProtocol
from casola.wire import (
    DEFAULT_LIMITS,
    Connection,
    ConnectionTerminated,
    ConnState,
    Event,
    Frame,
    FrameType,
    GoAwayMeta,
    HelloMeta,
    Limits,
    Side,
    error_name,
)

__all__ = ["BACKLOG", "HelloHandler", "MemoryDialer", "Refused", "accept_memory", "dial_tcp", "serve_tcp"]

log = logging.getLogger("casola.net")

BACKLOG = 2048  # the listen queue: asyncio's default of 100 overflowed at 256 clients dialing at once

HelloHandler = Callable[[LinkBase, Frame], None]


class Refused(ConnectionLost):
    """The acceptor refused the handshake (GOAWAY with `code`), or the role refuses a HELLO."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"refused ({error_name(code)}): {message}")
        self.code = code
        self.message = message


def _acceptor_router(on_hello: HelloHandler, refusals: RateLimitedLog) -> EventHandler:
    """Events of a fresh acceptor link: the first is HELLO (the core enforces it); the rest go to
    whatever handler the role installed while answering it. Each refused connection is one line
    of `refusals` (rate-limited), never a traceback."""

    def route(link: LinkBase, events: list[Event]) -> None:
        first = events[0]
        if not (isinstance(first, Frame) and first.type is FrameType.HELLO) or (
            link.conn.state is not ConnState.AWAIT_ACCEPT
        ):
            # No HELLO, or the connection failed right after it (junk, a pipelined REQUEST): the
            # core has said why (GOAWAY, and one log line); nothing for the role to answer.
            link.close()
            return
        try:
            on_hello(link, first)
        except Refused as exc:
            refusals.warning("refused connection from %s: %s: %s", link.peername, error_name(exc.code), exc.message)
            link.conn.goaway(exc.code, exc.message[:200])
            link.close()
            return
        if len(events) > 1 and link.on_events is not route:
            link.on_events(link, events[1:])

    return route


class _DialWaiter:
    """The dialer's events until HELLO_ACK; then the role's."""

    def __init__(self, on_events: EventHandler, on_lost: LostHandler | None) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_events, self._on_lost = on_events, on_lost

    def events(self, link: LinkBase, events: list[Event]) -> None:
        for i, ev in enumerate(events):
            if isinstance(ev, Frame) and ev.type is FrameType.HELLO_ACK:
                link.on_events, link.on_lost = self._on_events, self._on_lost
                if not self.done.done():
                    self.done.set_result(None)
                if i + 1 < len(events):
                    link.on_events(link, events[i + 1 :])
                return
            if isinstance(ev, Frame) and ev.type is FrameType.GOAWAY:
                meta = ev.meta
                assert isinstance(meta, GoAwayMeta)
                self._fail(Refused(meta.code, meta.message))
            elif isinstance(ev, ConnectionTerminated):
                self._fail(Refused(ev.code, ev.message) if ev.code else ConnectionLost(ev.message))

    def lost(self, link: LinkBase, exc: BaseException | None) -> None:
        self._fail(ConnectionLost(f"connection lost during handshake: {exc or 'closed by peer'}"))

    def _fail(self, exc: ConnectionLost) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _handshake(link: LinkBase, waiter: _DialWaiter, hello: HelloMeta, timeout: float) -> None:
    link.on_events, link.on_lost = waiter.events, waiter.lost
    link.send(Frame(FrameType.HELLO, meta=hello))
    try:
        await asyncio.wait_for(asyncio.shield(waiter.done), timeout)
    except BaseException:
        link.close()
        raise


async def dial_tcp(
    host: str,
    port: int,
    hello: HelloMeta,
    on_events: EventHandler,
    on_lost: LostHandler | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
    auto_credit: bool = True,
    timeout: float = 5.0,
    ssl: SSLContext | None = None,
    server_hostname: str | None = None,
) -> FrameProtocol:
    """Connect, send HELLO, wait for HELLO_ACK; afterwards events go to `on_events`.

    Raises:
        Refused: the acceptor answered GOAWAY (bad credential, version, role).
        ConnectionLost: the connection failed or closed during the handshake.
        OSError, asyncio.TimeoutError: connecting failed or took longer than `timeout`.
    """
    loop = asyncio.get_running_loop()
    waiter = _DialWaiter(on_events, on_lost)
    conn = Connection(Side.DIALER, loop.time(), limits, auto_credit=auto_credit)
    tls: dict[str, Any] = {} if ssl is None else {"ssl": ssl, "server_hostname": server_hostname or host}
    _, proto = await asyncio.wait_for(loop.create_connection(lambda: FrameProtocol(conn), host, port, **tls), timeout)
    await _handshake(proto, waiter, hello, timeout)
    return proto


async def serve_tcp(
    host: str,
    port: int,
    on_hello: HelloHandler,
    *,
    limits: Limits = DEFAULT_LIMITS,
    auto_credit: bool = True,
    ssl: SSLContext | None = None,
    backlog: int = BACKLOG,
) -> asyncio.Server:
    """Listen for links; each new one's HELLO goes to `on_hello` (see module doc). With `ssl`, TLS
    is negotiated first (within the handshake timeout of `limits`). `backlog`: connections the kernel
    queues before they are accepted (asyncio's 100 overflows when hundreds dial at once)."""
    loop = asyncio.get_running_loop()
    refusals = RateLimitedLog(log)
    route = _acceptor_router(on_hello, refusals)

    def factory() -> FrameProtocol:
        proto = FrameProtocol(Connection(Side.ACCEPTOR, loop.time(), limits, auto_credit=auto_credit), route)
        proto.error_log = refusals
        return proto

    tls: dict[str, Any] = {} if ssl is None else {"ssl": ssl, "ssl_handshake_timeout": limits.handshake_timeout}
    return await loop.create_server(factory, host, port, reuse_address=True, backlog=backlog, **tls)


MemoryDialer = Callable[..., Awaitable[LinkBase]]


def accept_memory(on_hello: HelloHandler, *, limits: Limits = DEFAULT_LIMITS, auto_credit: bool = True) -> MemoryDialer:
    """An in-process acceptor: returns a `connect(hello, on_events, on_lost, ...)` coroutine function
    that behaves like `dial_tcp` against `serve_tcp(on_hello)`."""
    refusals = RateLimitedLog(log)
    route = _acceptor_router(on_hello, refusals)

    async def connect(
        hello: HelloMeta,
        on_events: EventHandler,
        on_lost: LostHandler | None = None,
        *,
        dial_limits: Limits = DEFAULT_LIMITS,
        dial_auto_credit: bool = True,
        timeout: float = 5.0,
    ) -> LinkBase:
        loop = asyncio.get_running_loop()
        now = loop.time()
        a, b = memory_pair(
            Connection(Side.DIALER, now, dial_limits, auto_credit=dial_auto_credit, in_memory=True),
            Connection(Side.ACCEPTOR, now, limits, auto_credit=auto_credit, in_memory=True),
        )
        b.on_events, b.error_log = route, refusals
        waiter = _DialWaiter(on_events, on_lost)
        await _handshake(a, waiter, hello, timeout)
        return a

    return connect
