"""WebSocket connections (RFC 6455) on the ingress's HTTP/1.1 server: the opening handshake's checks and
its 101, and `WebSocket`, the asyncio protocol a connection is handed to after it.

wsproto parses what the client sends (sans-I/O: bytes in, events out; it checks masking, opcodes,
fragmentation, control-frame rules and the UTF-8 of text) and frames the control messages. Data messages
out are framed here, a small header and then the payload, never joined when large (STYLE §3; a server's
frames are not masked). No extension is negotiated, ever: permessage-deflate stays off (audio does not
compress, and an inflated message cannot be bounded before it is inflated).

Limits (`WsLimits`), each with what happens past it:
- a message larger than `max_message` (text counted in UTF-8 bytes, all its fragments together):
  close 1009, before the rest of it is buffered;
- keep-alive: a Ping every `ping_interval` seconds; no Pong within `ping_timeout`: close 1011. A Close
  of ours unanswered for `ping_timeout` ends the connection anyway;
- slow readers, as on the HTTP path: messages out have no credit upstream (SPEC §7.3), so what a client
  does not take piles up here. Past `max_unread` bytes not taken, or after `send_timeout` without
  taking a byte, the connection is aborted and its buffers dropped (close code 1006 to the app).

The app (`WsApp`) is told `ws_opened()` once the connection is its, each complete message, and
`ws_closed(code, reason, by_peer)` exactly once, whatever ended the WebSocket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import struct
from collections.abc import Callable
from time import monotonic as _clock
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import msgspec
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError, generate_accept_token

from casola.net.sendqueue import taken as bytes_taken

if TYPE_CHECKING:
    from casola.ingress.exchange import Exchange

__all__ = [
    "BINARY",
    "CLOSE_ABNORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_RESTART",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_LATER",
    "TEXT",
    "HandshakeError",
    "WebSocket",
    "WsApp",
    "WsLimits",
    "accept",
    "check_handshake",
]

log: Final = logging.getLogger("casola.ingress")

Buffer = bytes | bytearray | memoryview

TEXT: Final = 0x1  # opcodes (RFC 6455 §5.2)
BINARY: Final = 0x2
# Close codes (RFC 6455 §7.4.1; 1012 and 1013 from the IANA registry)
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_ABNORMAL: Final = 1006  # never sent: the connection ended without a Close
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_RESTART: Final = 1012
CLOSE_TRY_LATER: Final = 1013

_VERSION: Final = b"13"  # RFC 6455 §4.1: the only version there is
_JOIN_MAX: Final = 4096  # as exchange.py: a smaller payload is joined to its header, one write
_H16: Final = struct.Struct("!BBH")
_H64: Final = struct.Struct("!BBQ")
_INF: Final = float("inf")

# Connection states (of this adapter; wsproto keeps the protocol's own)
_OPEN: Final = 0  # messages both ways
_CLOSING: Final = 1  # our Close is sent; waiting for the peer's
_DONE: Final = 2  # the transport is closing or closed


class WsLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-connection limits of a WebSocket; every one has its consequence and a precedent.

    Attributes:
        max_message: bytes of one message in -> close 1009. 1 MiB: the `websockets` library's default;
            10 s of 48 kHz PCM16 mono audio, far more than one 20 ms chunk.
        ping_interval: seconds between keep-alive Pings; 0 sends none. 20 s, as `websockets` and
            browsers' idle proxies expect (many drop a connection idle for 30-60 s).
        ping_timeout: seconds the peer has to answer a Ping (else close 1011) or our Close (else the
            connection is closed without its answer). 20 s, as `websockets`.
        max_unread: bytes written for the client and not yet taken before it is dropped (8 MiB: over
            80 s of 24 kHz PCM16 audio the client's player has not pulled).
        send_timeout: seconds the client may take no byte while some wait for it (the HTTP listener's).
    """

    max_message: int = 1024 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    max_unread: int = 8 * 1024 * 1024
    send_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_message < 1 or self.max_unread < 1:
            raise ValueError("WebSocket max_message and max_unread must be positive")
        if self.ping_interval < 0 or self.ping_timeout <= 0 or self.send_timeout <= 0:
            raise ValueError("WebSocket ping_interval must be >= 0, ping_timeout and send_timeout positive")


_DEFAULT_LIMITS: Final = WsLimits()


class WsApp(Protocol):
    """What a `WebSocket` tells the app that owns it (each call from the event loop)."""

    def ws_opened(self) -> None:
        """The connection is the WebSocket's: messages may be sent from now on."""

    def ws_message(self, opcode: int, data: bytes) -> None:
        """One complete message: `opcode` TEXT (data is its UTF-8, already checked) or BINARY."""

    def ws_closed(self, code: int, reason: str, by_peer: bool) -> None:
        """The WebSocket ended, once: `by_peer` when the client sent the first Close (its code),
        else the code we sent (the app's own `close`, or a limit), or 1006: the connection ended
        without a Close (lost, or aborted as a slow reader)."""


class HandshakeError(Exception):
    """The upgrade request is not a valid WebSocket opening handshake (RFC 6455 §4.2.1).

    Attributes:
        status: the HTTP status to refuse it with; headers: what that answer must carry.
    """

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []


def check_handshake(ex: Exchange) -> bytes:
    """Check a WebSocket upgrade request (`ex.upgrade`; HttpProtocol has checked GET, HTTP/1.1,
    `Connection: upgrade` and `Upgrade: websocket`) and return its `Sec-WebSocket-Accept` value.

    Raises:
        HandshakeError: 426 with `Sec-WebSocket-Version: 13` for another version (RFC 6455 §4.4);
            400 for a missing or malformed `Sec-WebSocket-Key`.
    """
    version = ex.header(b"sec-websocket-version")
    if version != _VERSION:
        got = "none" if version is None else repr(version.decode("latin-1"))
        raise HandshakeError(426, f"Sec-WebSocket-Version {got} is not supported: use 13 (RFC 6455)",
                             [(b"sec-websocket-version", _VERSION)])  # fmt: skip
    key = ex.header(b"sec-websocket-key")
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 random bytes in base64 (RFC 6455 §4.1)") from None
    return generate_accept_token(key)


def accept(ex: Exchange, ws: WebSocket, accept_token: bytes) -> bool:
    """Answer the handshake with 101 and hand the connection to `ws` (no extension, no subprotocol).

    Returns:
        False when the client is already gone (nothing was sent; `ws` is never opened).

    Raises:
        Nothing else: `accept_token` comes from `check_handshake`.
    """
    headers = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", accept_token)]
    return ex.switch_protocols(headers, ws)


def _frame_head(opcode: int, n: int) -> bytes:
    """The header of one whole unmasked frame with an `n`-byte payload (RFC 6455 §5.2, minimal length)."""
    if n < 126:
        return bytes((0x80 | opcode, n))
    if n < 0x10000:
        return _H16.pack(0x80 | opcode, 126, n)
    return _H64.pack(0x80 | opcode, 127, n)


class WebSocket(asyncio.Protocol):
    """One server-side WebSocket connection, after the 101. Methods without `_` are for the app."""

    __slots__ = (
        "_app",
        "_fd",
        "_handlers",
        "_limits",
        "_loop",
        "_opcode",
        "_parts",
        "_paused_at",
        "_ping_at",
        "_ping_data",
        "_ping_n",
        "_pong_by",
        "_read_paused",
        "_size",
        "_state",
        "_taken",
        "_timer",
        "_timer_at",
        "_told",
        "_transport",
        "_until",
        "_write_paused",
        "_written",
        "_ws",
    )

    def __init__(self, app: WsApp, limits: WsLimits = _DEFAULT_LIMITS) -> None:
        self._app = app
        self._limits = limits
        self._ws = Connection(ConnectionType.SERVER)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._state = _OPEN
        self._told = False  # ws_closed was called
        self._parts: list[bytes] = []  # the fragments of the message coming in
        self._size = 0
        self._opcode = 0
        self._read_paused = self._write_paused = False
        self._written = self._taken = 0  # bytes written; of them, taken by the client
        self._fd = -1  # the socket's, for its kernel send queue (casola.net.sendqueue)
        self._paused_at = 0.0
        self._ping_at = _INF  # when the next Ping goes out
        self._pong_by = _INF  # when the outstanding Ping's Pong is due (inf: none outstanding)
        self._ping_n = 0
        self._ping_data = b""
        self._until = _INF  # _CLOSING or _DONE: when we stop waiting for the peer
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            TextMessage: self._on_data,
            BytesMessage: self._on_data,
            Ping: self._on_ping,
            Pong: self._on_pong,
            CloseConnection: self._on_close,
        }

    # -- for the app ---------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Messages may be sent (no Close sent or received, the connection not lost)."""
        return self._state == _OPEN and self._transport is not None

    @property
    def peer(self) -> str:
        """The client's "host:port" ("" when unknown)."""
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""

    @property
    def writing_paused(self) -> bool:
        return self._write_paused

    @property
    def write_buffered(self) -> int:
        """Bytes written for the client that it has not taken yet (the transport's buffer)."""
        t = self._transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()

    def send(self, opcode: int, data: Buffer) -> bool:
        """Send one message (TEXT: `data` is UTF-8, which the caller has checked; BINARY). A client
        that leaves more than `max_unread` bytes untaken is dropped here.

        Returns:
            False when the WebSocket is closing or closed (nothing was sent) or the client was just dropped.

        Raises:
            Nothing.
        """
        t = self._transport
        if self._state != _OPEN or t is None:
            return False
        n = len(data)
        head = _frame_head(opcode, n)
        if n <= _JOIN_MAX:
            t.write(head + data)
        else:
            t.writelines([head, data])
        self._written += len(head) + n
        if t.get_write_buffer_size() > self._limits.max_unread:
            self.abort(f"the client left more than {self._limits.max_unread} bytes unread")
            return False
        return True

    def close(self, code: int = CLOSE_NORMAL, reason: str = "", *, wait: bool = True) -> None:
        """Send a Close with `code` (and `reason`, cut to 123 bytes) and stop taking messages; the app
        gets `ws_closed(code, reason, False)` now. With `wait` the connection closes when the peer
        answers (or after `ping_timeout`); without, as soon as the Close is written (shutdown).
        Idempotent; raises nothing."""
        if self._state != _OPEN or self._transport is None:
            return
        self._state = _CLOSING
        self._write(self._ws.send(CloseConnection(code, reason)))
        self._tell(code, reason, False)
        if wait:
            self._until = _clock() + self._limits.ping_timeout
            self._arm_at(self._until)
        else:
            self._shut()

    def abort(self, reason: str) -> None:
        """Drop the connection now, what is buffered for the client with it (`ws_closed(1006, reason)`)."""
        if self._state != _DONE:
            self._state = _DONE
            log.warning("WebSocket %s dropped: %s", self.peer, reason)
        if self._transport is not None:
            self._transport.abort()
        self._tell(CLOSE_ABNORMAL, reason, False)

    def pause_reading(self) -> None:
        """Stop reading the client (the app's own backpressure: its upstream is full). Idempotent."""
        if not self._read_paused:
            self._read_paused = True
            if self._transport is not None and self._state != _DONE:
                self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self._transport is not None and self._state != _DONE:
                self._transport.resume_reading()

    # -- transport callbacks ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = t.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        if self._read_paused:  # the app paused before the hand-over
            t.pause_reading()
        limits = self._limits
        # The transport comes from the HTTP protocol, its write-buffer marks with it (casola/ingress/http.py);
        # were it paused for writing at the hand-over, this protocol would only hear of the resume.
        self._write_paused = t.get_write_buffer_size() > t.get_write_buffer_limits()[1]
        if limits.ping_interval:
            self._ping_at = _clock() + limits.ping_interval
            self._arm_at(self._ping_at)
        try:
            self._app.ws_opened()
        except Exception:
            log.exception("WebSocket app failed to open")
            self.close(CLOSE_INTERNAL, "internal error")

    def data_received(self, data: bytes) -> None:
        if self._state == _DONE:
            return
        try:
            self._ws.receive_data(data)
        except LocalProtocolError:
            return  # wsproto is closed: nothing more is read
        handlers = self._handlers
        for event in self._ws.events():
            handlers[type(event)](event)
            if self._state == _DONE:
                return

    def eof_received(self) -> bool:
        return False  # the client shut its side without a Close: close ours (connection_lost: 1006)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _DONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._parts = []
        self._tell(CLOSE_ABNORMAL, "the connection was lost", False)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._paused_at = _clock()
        self._arm_at(self._paused_at + self._limits.send_timeout)

    def resume_writing(self) -> None:
        self._write_paused = False

    # -- wsproto events ---------------------------------------------------------------------------------

    def _on_data(self, ev: TextMessage | BytesMessage) -> None:
        if self._state != _OPEN:
            return  # after our Close: dropped (RFC 6455 §7.1.2)
        data = ev.data.encode() if isinstance(ev, TextMessage) else bytes(ev.data)
        if not self._parts and not self._size:
            self._opcode = TEXT if isinstance(ev, TextMessage) else BINARY
        self._size += len(data)
        if self._size > self._limits.max_message:
            self._parts = []
            self.close(CLOSE_TOO_BIG, f"a message is limited to {self._limits.max_message} bytes")
            return
        if data:
            self._parts.append(data)
        if ev.message_finished:
            parts, self._parts, self._size = self._parts, [], 0
            message = parts[0] if len(parts) == 1 else b"".join(parts)
            try:
                self._app.ws_message(self._opcode, message)
            except Exception:
                log.exception("WebSocket app failed on a message")
                self.close(CLOSE_INTERNAL, "internal error")

    def _on_ping(self, ev: Ping) -> None:
        if self._ws.state is ConnectionState.OPEN:
            self._write(self._ws.send(ev.response()))

    def _on_pong(self, ev: Pong) -> None:
        if ev.payload == self._ping_data and self._pong_by < _INF:
            self._pong_by = _INF
            self._arm_at(self._ping_at)  # the timer waited for the pong's deadline

    def _on_close(self, ev: CloseConnection) -> None:
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING):
            # No Close frame came (that would have moved wsproto on): wsproto reports bytes it cannot
            # parse this way. The client broke the protocol (1002; 1007: bad UTF-8): say so and end.
            if self._state == _OPEN:
                self.close(ev.code, ev.reason or "protocol error", wait=False)
            else:
                self._shut()
            return
        by_peer = self._state == _OPEN
        if by_peer:  # answer with its code (RFC 6455 §5.5.1); wsproto sends no code for 1005
            self._write(self._ws.send(ev.response()))
        self._shut()  # RFC 6455 §7.1.1: the server closes the TCP connection first
        self._tell(ev.code, ev.reason or "", by_peer)

    # -- the rest ---------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None and self._state != _DONE:
            self._written += len(data)
            self._transport.write(data)

    def _shut(self) -> None:
        """Close the transport once what is buffered is out; abort it if that takes `ping_timeout`."""
        self._state = _DONE
        t = self._transport
        if t is None:
            return
        if self._read_paused:  # a paused reader would never see the peer's FIN
            t.resume_reading()
        t.close()
        self._until = _clock() + self._limits.ping_timeout
        self._arm_at(self._until)

    def _tell(self, code: int, reason: str, by_peer: bool) -> None:
        if self._told:
            return
        self._told = True
        try:
            self._app.ws_closed(int(code), reason, by_peer)
        except Exception:
            log.exception("WebSocket app failed on close")

    # -- the one timer -------------------------------------------------------------------------------

    def _arm_at(self, when: float) -> None:
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        if self._loop is None:
            return
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        now = _clock() + 0.001  # uvloop's timers are 1 ms grained and may fire a fraction early
        if self._state == _DONE:
            if now >= self._until and self._transport is not None:
                self._transport.abort()  # the buffered rest never went out: drop it
                return
        elif self._state == _CLOSING:
            if now >= self._until:
                self._shut()  # no answer to our Close: end without it
        elif not (self._check_send(now) and self._check_ping(now)):
            return  # dropped, or closing (which armed its own deadline)
        due = self._due()
        if due < _INF:
            self._arm_at(due)

    def _check_send(self, now: float) -> bool:
        """The slow-reader clock; False when the client was dropped."""
        if not self._write_paused or self._transport is None:
            return True
        taken = bytes_taken(self._written, self._transport, self._fd)
        if taken > self._taken:  # it reads, if slowly: the timeout counts from its last bytes
            self._taken, self._paused_at = taken, now
        elif now >= self._paused_at + self._limits.send_timeout:
            self.abort(f"the client took no bytes for {self._limits.send_timeout:g} s")
            return False
        return True

    def _check_ping(self, now: float) -> bool:
        """Keep-alive; False when the peer did not answer and the WebSocket is closing."""
        if now >= self._pong_by:
            self.close(CLOSE_INTERNAL, "keepalive ping timeout")
            return False
        if self._pong_by == _INF and now >= self._ping_at:  # one Ping outstanding at a time
            self._ping_n += 1
            self._ping_data = self._ping_n.to_bytes(4, "big")
            self._write(self._ws.send(Ping(self._ping_data)))
            self._pong_by = now + self._limits.ping_timeout
            self._ping_at = now + self._limits.ping_interval
        return True

    def _due(self) -> float:
        if self._state != _OPEN:
            return self._until
        due = self._pong_by if self._pong_by < _INF else self._ping_at
        if self._write_paused:
            due = min(due, self._paused_at + self._limits.send_timeout)
        return due
