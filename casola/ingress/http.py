"""The ingress's HTTP/1.1 server: an asyncio protocol around httptools, no framework.

`HttpProtocol` parses with httptools (llhttp) and calls the app's handler with an `Exchange` as soon as
a request head is complete; the body is pushed to the app as it arrives. It keeps HTTP/1.1 honest:
keep-alive, strictly ordered pipelining (bounded look-ahead), chunked bodies both ways, 100-continue,
head/URL/header/body limits, request-smuggling refusal (Content-Length with Transfer-Encoding), lingering
close, and three timeouts (idle, head, body) driven by one timer handle per connection that is re-armed
lazily. Flow control (STYLE §6): explicit write-buffer marks and a `WriteGate` for writers; read pausing
for the app (`pause_body`), for pipelined look-ahead and for buffered body bytes.

Upgrades: a GET asking for `Upgrade: websocket` (RFC 6455 §4.1) reaches the app with `Exchange.upgrade`
set; the app refuses it with any normal answer (the connection then closes: the parser stops at an
upgrade) or accepts it with `Exchange.switch_protocols`, which writes the 101 and hands the transport,
and every byte that came after the request head, to another protocol (casola/ingress/websocket.py).
Any other upgrade, and CONNECT, is refused with 400.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from time import monotonic as _clock
from typing import Any, Final, cast

import httptools

from casola.ingress.exchange import Exchange, error_response
from casola.ingress.httplimits import HttpLimits, RequestError
from casola.ingress.httpsyntax import TAIL, absolute_target, declared_chunk_size
from casola.net.gate import WriteGate
from casola.net.sendqueue import taken as bytes_taken

__all__ = ["Exchange", "Handler", "HttpLimits", "HttpProtocol", "RequestError", "serve_http"]

_log: Final = logging.getLogger("casola.ingress")

Handler = Callable[[Exchange], None]
Buffer = bytes | bytearray | memoryview

# Buffered request-body bytes (pipelined requests, or an app that has not set on_body yet) above which
# reading pauses, and below which it resumes. Same marks as the frame protocol's write buffer.
RX_HIGH: Final = 1024 * 1024
RX_LOW: Final = 256 * 1024
# After an error response or a Connection: close, the write side is shut and the read side drained for
# up to this long, so that unread request bytes do not make the kernel send a RST that destroys the
# response in flight (RFC 9112 §9.6; nginx's lingering_close, 5 s there).
LINGER: Final = 2.0

_SPECIAL: Final = frozenset((b"content-length", b"transfer-encoding", b"expect"))
_INF: Final = float("inf")

# Timestamps (t_start, deadlines) read time.monotonic(): what asyncio's loop.time() returns. uvloop's
# loop.time() reads the same clock but at 1 ms resolution, cached per loop iteration: too coarse to time
# sub-millisecond overhead. On Linux perf_counter() reads this clock too, so `perf_counter() - t_start`
# is a valid duration there.

# Read-pause reasons (bits); reading resumes when none is left.
_P_APP: Final = 1  # the app paused the body of the request being answered
_P_PIPE: Final = 2  # max_pipeline requests are parsed ahead
_P_BUF: Final = 4  # buffered body bytes above RX_HIGH
_P_STOP: Final = 8  # parsing stopped for good: an error response waits behind earlier responses

# What the connection's one timer checks.
_T_NONE: Final = 0
_T_IDLE: Final = 1
_T_HEAD: Final = 2
_T_BODY: Final = 3
_T_LINGER: Final = 4
_T_SEND: Final = 5


_DEFAULT_LIMITS: Final = HttpLimits()


class _Stop(Exception):
    """Raised from a parser callback to stop parsing while the connection closes."""


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 server connection. The `on_*` methods are httptools callbacks, not for the app."""

    __slots__ = tuple(
        "_active _broken _buffered _check _chunk_open _chunk_seen _chunked _cl _closing _cur _feeding _gate "
        "_handler _head_len _tail "
        "_idle_t0 _in_head _last_rx _limits _linger_t0 _lingering _loop _max_body _max_head _max_headers _paused_at "
        "_fd _taken _written "
        "_max_pipeline _max_url _now _parser _pause _pending _queue _raw _raw_cap _server_line _tick _timer "
        "_timer_at _transport _url _upgrading _switch_to _up_tail".split()
    )

    def __init__(
        self, handler: Handler, limits: HttpLimits = _DEFAULT_LIMITS, *, server_header: bytes = b"casola"
    ) -> None:
        """Args:
            handler: called with each `Exchange` when its request head is complete.
            limits: sizes, counts and timeouts for this connection.
            server_header: the `Server:` value; b"" sends none.

        Raises:
            Nothing; the parser and timer start in `connection_made`.
        """
        self._handler = handler
        self._limits = limits
        self._max_head, self._max_url, self._max_headers = limits.max_head, limits.max_url, limits.max_headers
        self._max_body, self._max_pipeline = limits.max_body, limits.max_pipeline
        self._raw_cap = 2 * limits.max_body + limits.max_head  # chunked framing, extensions, trailers
        self._tick = min(limits.idle_timeout, limits.head_timeout, limits.body_timeout, limits.send_timeout)
        self._server_line = b"Server: " + server_header + b"\r\n" if server_header else b""
        self._parser = httptools.HttpRequestParser(self)
        self._loop: asyncio.AbstractEventLoop = cast(asyncio.AbstractEventLoop, None)
        self._transport: asyncio.Transport = cast(asyncio.Transport, None)
        self._gate = WriteGate()
        self._queue: deque[Exchange] = deque()  # head complete, waiting for the one being answered
        self._active: Exchange | None = None  # handed to the handler, response not ended
        self._cur: Exchange | None = None  # being parsed (head or body)
        self._check: Exchange | None = None  # ended with its body unread: close unless it ends this read
        self._pending: RequestError | None = None  # to answer after the queued requests, then close
        self._in_head = False
        self._url = b""
        self._head_len = self._raw = 0
        self._cl = -1
        self._chunked = False
        self._chunk_open = False  # a chunk's size line was parsed in this read, its data not all here
        self._chunk_seen = 0  # of that chunk's data, bytes parsed in this read
        self._tail = b""  # the end of the previous read of a chunked body (a size line may span reads)
        self._pause = 0
        self._buffered = 0
        self._feeding = self._broken = self._closing = self._lingering = False
        self._now = self._last_rx = self._idle_t0 = self._linger_t0 = self._paused_at = 0.0
        self._written = self._taken = 0  # response bytes written; of them, taken by the client
        self._fd = -1  # the socket's, for its kernel send queue (casola.net.sendqueue)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._upgrading: Exchange | None = None  # a WebSocket upgrade request (the parser stops after it)
        self._switch_to: asyncio.BaseProtocol | None = None  # the app accepted it: the connection's next protocol
        self._up_tail: bytes | None = None  # the bytes after its head, once the parser got there

    # -- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = t.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = sock.fileno() if sock is not None else -1
        t.set_write_buffer_limits(high=self._limits.write_high, low=self._limits.write_low)
        self._idle_t0 = now = _clock()
        self._arm_at(now + self._tick)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return  # closing, lingering, or an error is waiting its turn: discard
        if self._up_tail is not None:  # past an upgrade request's head, the app not decided yet
            self._up_tail += data
            return
        self._now = self._last_rx = _clock()
        cur = self._cur
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._parse_failed(exc.__context__)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_at(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._reject(RequestError(400, "bad_request", f"malformed HTTP request: {exc}"))
        finally:
            self._feeding = False
        if self._chunked and not self._broken:
            self._chunk_limit(data)
        if self._check is not None:  # a response ended before its body did, and this read did not finish it
            self._check = None
            self._close(linger=True)
        elif cur is not None and cur is self._cur and not self._broken:
            self._count_raw(len(data))

    def _chunk_limit(self, data: bytes) -> None:
        """A chunk whose size line came in this read and whose data goes beyond the body limit: 413
        now, not when the body timeout ends the wait for data that is not allowed anyway."""
        if self._chunk_open:
            self._chunk_open = False
            ex = self._cur
            size = declared_chunk_size(self._tail, data, self._chunk_seen)
            if ex is not None and size is not None and ex._rx - self._chunk_seen + size > self._max_body:
                self._reject(RequestError(413, "request_too_large", f"the request body exceeds {self._max_body} bytes"))
                return
        self._tail = data[-TAIL:] if len(data) >= TAIL else (self._tail + data)[-TAIL:]

    def eof_received(self) -> bool:
        # The client closed its side: it is gone, as uvicorn and nginx take it (a half-closed client that
        # still waits for answers is rare; an abandoned generation on a GPU is not). The request being
        # answered is aborted (on_abort(None)), queued ones are dropped, and the connection closes.
        self._closing = self._broken = True
        ex = self._active
        if ex is not None and not ex.finished and not ex._gone:
            ex._lose(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = self._broken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lost = exc if isinstance(exc, ConnectionError) else ConnectionResetError("the client connection closed")
        self._gate.fail(lost)
        ex = self._active
        self._active = self._cur = self._check = None
        self._queue.clear()  # never started: nothing to tell
        if ex is not None and not ex.finished and not ex._gone:
            ex._lose(exc)

    def write(self, data: Buffer) -> None:
        """Every response byte goes out through here or `writelines`: counted, so the send timeout
        can tell a client that reads slowly from one that reads nothing."""
        self._written += len(data)
        self._transport.write(data)

    def writelines(self, parts: list[Buffer], n: int) -> None:
        """`parts` (`n` bytes in all) in one call, never joined."""
        self._written += n
        self._transport.writelines(parts)

    def pause_writing(self) -> None:
        self._gate.pause()
        self._paused_at = _clock()  # the send timeout counts from here (see _deadline)

    def resume_writing(self) -> None:
        self._gate.resume()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closing:
            raise _Stop
        self._cur = Exchange(self, self._now)
        self._in_head = True
        self._url = b""
        self._head_len = self._raw = 0
        self._cl = -1
        self._chunked = False
        self._tail = b""

    def on_url(self, url: bytes) -> None:
        if self._url:
            url = self._url + url  # split across reads
        self._url = url
        self._head_len = len(url)
        if len(url) > self._max_url:
            raise RequestError(414, "url_too_long", f"the request URL exceeds {self._max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_len + len(name) + len(value) + 4
        self._head_len = size
        if size > self._max_head:
            raise RequestError(431, "headers_too_large", f"the request head exceeds {self._max_head} bytes")
        if self._in_head:  # else a trailer field: counted against max_head, then dropped
            headers = self._cur.headers  # type: ignore[union-attr]
            if len(headers) >= self._max_headers:
                raise RequestError(431, "headers_too_large", f"more than {self._max_headers} header fields")
            name = name.lower()
            if name in _SPECIAL:
                self._special(name, value)
            headers.append((name, value.rstrip()))

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        ex: Exchange = self._cur  # type: ignore[assignment]
        version = p.get_http_version()
        if version == "1.0":
            ex._http10 = True
            ex._expect = False  # RFC 9110 §10.1.1: ignore 100-continue from HTTP/1.0
        elif version != "1.1":
            raise RequestError(400, "bad_request", f"HTTP/{version} is not supported")
        if p.should_upgrade():
            self._check_upgrade(ex)
        url = self._url
        if url[:1] != b"/" and (absolute := absolute_target(url)) is not None:  # RFC 9112 §3.2.2
            authority, url = absolute
            if not authority:  # RFC 9110 §4.2.1: an http(s) URI with no host is invalid
                raise RequestError(400, "bad_request", "an absolute-form target must name a host")
            ex.headers = [h for h in ex.headers if h[0] != b"host"]
            ex.headers.append((b"host", authority))
        i = url.find(b"?")
        if i < 0:
            ex.path = url
        else:
            ex.path, ex.query = url[:i], url[i + 1 :]
        ex.method = p.get_method()
        ex._keep_alive = p.should_keep_alive()
        ex.t_head = self._now
        if not self._chunked and self._cl <= 0:
            ex.body_complete = True
            ex.t_body = self._now
        if self._active is None:
            self._dispatch(ex)
        else:
            self._queue.append(ex)
            if len(self._queue) >= self._max_pipeline:
                self._set_pause(_P_PIPE, True)

    def on_body(self, chunk: bytes) -> None:
        ex: Exchange = self._cur  # type: ignore[assignment]
        if ex.finished or ex._gone:
            return  # answered without reading it: dropped (the connection closes unless it ends now)
        ex._rx += len(chunk)
        if self._chunk_open:
            self._chunk_seen += len(chunk)
        if ex._rx > self._max_body:
            raise RequestError(413, "request_too_large", f"the request body exceeds {self._max_body} bytes")
        if ex._ready and not ex._paused and not ex._buf and (cb := ex._on_body) is not None:
            try:
                cb(chunk)
            except Exception as exc:
                self._app_failed(ex, exc)
            return
        if ex._buf is None:
            ex._buf = deque()
        ex._buf.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > RX_HIGH:
            self._set_pause(_P_BUF, True)

    def on_chunk_header(self) -> None:
        self._chunk_open = True
        self._chunk_seen = 0

    def on_chunk_complete(self) -> None:
        self._chunk_open = False

    def on_message_complete(self) -> None:
        ex: Exchange = self._cur  # type: ignore[assignment]
        self._cur = None
        ex.body_complete = True
        ex.t_body = self._now
        if ex is self._check:  # answered early, and the unread rest arrived in the same read
            self._check = None
            self._next()
        elif ex._ready and not (ex._buf or ex._paused or ex._end_sent or ex.finished or ex._gone):
            if (end := ex._on_body_end) is not None:
                ex._end_sent = True
                try:
                    end()
                except Exception as exc:
                    self._app_failed(ex, exc)

    def _special(self, name: bytes, value: bytes) -> None:
        """Content-Length, Transfer-Encoding, Expect: the headers that frame the request."""
        if name == b"content-length":
            if self._chunked:  # request smuggling (RFC 9112 §6.1); llhttp refuses it too
                raise RequestError(400, "bad_request", "Content-Length with Transfer-Encoding")
            value = value.strip()
            if not value.isdigit():  # llhttp refuses these too
                raise RequestError(400, "bad_request", "invalid Content-Length")
            # 19+ digits cannot fit a sane limit (and int() refuses more than 4300 digits)
            self._cl = int(value) if len(value) < 19 else self._max_body + 1
            if self._cl > self._max_body:
                raise RequestError(413, "request_too_large", f"the request body exceeds {self._max_body} bytes")
        elif name == b"transfer-encoding":
            if self._cl >= 0:
                raise RequestError(400, "bad_request", "Transfer-Encoding with Content-Length")
            if value.strip().lower() != b"chunked":
                raise RequestError(501, "not_implemented", "only Transfer-Encoding: chunked is supported")
            self._chunked = True
        elif value.strip().lower() == b"100-continue":
            cast(Exchange, self._cur)._expect = True
        else:
            raise RequestError(417, "expectation_failed", "only Expect: 100-continue is supported")

    # -- upgrades (RFC 6455 §4.1) -------------------------------------------------------------------

    def _check_upgrade(self, ex: Exchange) -> None:
        """An upgrade request: a WebSocket one goes to the app, flagged; anything else is refused."""
        if self._parser.get_method() != b"GET" or ex._http10 or not _asks_websocket(ex.headers):
            raise RequestError(400, "bad_request", "protocol upgrades other than WebSocket (and CONNECT) are refused")
        if self._chunked or self._cl > 0:
            raise RequestError(400, "bad_request", "a WebSocket upgrade request has no body")
        ex.upgrade = b"websocket"
        ex._close = True  # a refused upgrade ends the connection: llhttp parses nothing after it
        self._upgrading = ex

    def _upgrade_at(self, tail: bytes) -> None:
        """The parser stopped after an upgrade request: what follows its head belongs to the next
        protocol. Handed over now if the app accepted already; else kept, reading paused, until it decides."""
        if self._upgrading is None:  # cannot happen: _check_upgrade flags every upgrade it lets through
            self._reject(RequestError(400, "bad_request", "unexpected protocol upgrade"))
            return
        if self._closing:
            return  # refused already: the tail is dropped with the connection
        self._up_tail = tail
        if self._switch_to is not None:
            self._hand_over()
        else:
            self._set_pause(_P_STOP, True)

    def _switch(self, ex: Exchange, protocol: asyncio.BaseProtocol) -> None:
        """`ex.switch_protocols` wrote the 101: the connection goes to `protocol` once the parser
        has passed the request head (at once if it has)."""
        self._switch_to = protocol
        if self._up_tail is not None:
            self._hand_over()

    def _hand_over(self) -> None:
        proto, tail = cast(asyncio.Protocol, self._switch_to), self._up_tail or b""
        self._closing = self._broken = True  # nothing of this protocol runs on this connection any more
        self._active = self._cur = self._check = self._upgrading = self._switch_to = None
        self._up_tail = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = self._transport
        if self._pause:
            self._pause = 0
            t.resume_reading()
        try:
            t.set_protocol(proto)
            proto.connection_made(t)
            if tail:
                proto.data_received(tail)
        except Exception:
            _log.exception("handing the connection over to %s failed", type(proto).__name__)
            t.abort()

    # -- requests in, responses out ------------------------------------------------------------

    def _dispatch(self, ex: Exchange) -> None:
        """Hand a request to the app, then send 100 Continue and buffered body as the app wants."""
        self._active = ex
        try:
            self._handler(ex)
        except Exception as exc:
            self._app_failed(ex, exc)
        ex._ready = True
        if ex.finished or ex._gone:
            return
        if ex._expect and not ex.started and not ex.body_complete:
            ex._write_continue()
        if ex._buf or ex.body_complete:
            ex._deliver()

    def _response_done(self, ex: Exchange) -> None:
        """An exchange ended its response: close, or go on with the next request."""
        self._active = None
        if ex._buf:
            self._drop_buffered(ex)
        if self._pause & _P_APP:
            self._set_pause(_P_APP, False)
        if self._closing:
            return
        if ex._close:
            self._close(linger=True)
        elif not ex.body_complete:
            if self._feeding and ex is self._cur:
                self._check = ex  # the rest may be in this very read; else close (never read on to keep alive)
            else:
                self._close(linger=True)
        else:
            self._next()

    def _next(self) -> None:
        if self._closing:
            return
        if self._queue:
            ex = self._queue.popleft()
            if self._pause & _P_PIPE and len(self._queue) < self._max_pipeline:
                self._set_pause(_P_PIPE, False)
            self._dispatch(ex)
        elif self._pending is not None:
            self._send_reject(self._pending)
        else:
            self._idle_t0 = self._now if self._feeding else _clock()

    def _app_failed(self, ex: Exchange, exc: Exception) -> None:
        """The handler or one of its callbacks raised: 500 if nothing was sent, else abort."""
        _log.error("HTTP handler failed for %s %s", ex.method.decode(), ex.path.decode("latin-1"), exc_info=exc)
        if ex.finished or ex._gone:
            return
        if ex.started:
            ex.abort()
        else:
            ex.send_error(500, "internal server error", "server_error", "internal_error")

    def _body_paused(self, ex: Exchange, paused: bool) -> None:
        if ex is self._active:
            self._set_pause(_P_APP, paused)

    def _drop_buffered(self, ex: Exchange) -> None:
        """Body chunks the app never took: gone with their exchange (else they would count forever)."""
        buf, ex._buf = ex._buf, None
        self._unbuffered(sum(map(len, buf or ())))

    def _unbuffered(self, n: int) -> None:
        self._buffered -= n
        if self._pause & _P_BUF and self._buffered <= RX_LOW:
            self._set_pause(_P_BUF, False)

    def _set_pause(self, bit: int, on: bool) -> None:
        old = self._pause
        new = old | bit if on else old & ~bit
        if new == old:
            return
        self._pause = new
        if self._closing:
            return
        if not old:
            self._transport.pause_reading()
        elif not new:
            self._transport.resume_reading()
            self._last_rx = _clock()  # the body timeout counts from here

    # -- errors and closing --------------------------------------------------------------------

    def _parse_failed(self, cause: BaseException | None) -> None:
        if isinstance(cause, _Stop):
            return
        if isinstance(cause, RequestError):
            self._reject(cause)
            return
        _log.error("HTTP parser callback failed", exc_info=cause)
        self._reject(RequestError(500, "internal_error", "internal server error"))

    def _count_raw(self, n: int) -> None:
        """Bound what httptools accumulates inside one head or chunked body across reads."""
        self._raw += n
        if self._in_head and self._raw > self._max_head:
            self._reject(RequestError(431, "headers_too_large", f"the request head exceeds {self._max_head} bytes"))
        elif self._raw > self._raw_cap:
            self._reject(RequestError(413, "request_too_large", f"the request body exceeds {self._max_body} bytes"))

    def _reject(self, err: RequestError) -> None:
        """The request being parsed broke a rule: answer it in turn, then close; parse nothing more."""
        self._broken = True
        if self._closing:
            return  # e.g. llhttp refusing bytes after a Connection: close message we already answered
        ex = self._cur
        if ex is not None and (ex.finished or ex._gone):
            self._check = None
            self._close(linger=True)  # already answered: nothing more to say
        elif ex is not None and ex is self._active:
            self._fail_active(ex, err)
        else:
            if ex is not None and self._queue and self._queue[-1] is ex:
                self._queue.pop()  # never started
            if self._active is None:
                self._send_reject(err)
            else:
                self._pending = err
                self._set_pause(_P_STOP, True)

    def _send_reject(self, err: RequestError) -> None:
        head_only = self._cur is not None and self._cur.method == b"HEAD"
        self.write(error_response(err.status, err.message, err.code, self._server_line, head_only=head_only))
        self._close(linger=True)

    def _fail_active(self, ex: Exchange, err: RequestError) -> None:
        """The request being answered broke a limit, stalled or went bad mid-body: error it, tell the app."""
        started = ex.started
        if not started:
            self.write(error_response(err.status, err.message, err.code, self._server_line))
        self._active = None
        self._close(linger=not started)
        ex._lose(err)

    def _close(self, *, linger: bool) -> None:
        """Close the connection; with `linger`, shut the write side and drain the read side first;
        without, abort it: bytes the client has not read yet are dropped, not kept until it reads."""
        if self._closing:
            return
        self._closing = self._broken = True
        t = self._transport
        if linger and t.can_write_eof():
            self._lingering = True
            if self._pause:
                self._pause = 0
                t.resume_reading()
            t.write_eof()
            self._linger_t0 = now = _clock()
            self._arm_at(now + LINGER)
        elif linger:
            t.close()  # TLS: no half-close; what is buffered still goes out
        else:
            t.abort()  # a truncated answer: drop what the client has not taken (it may never read it)

    # -- the one timer ---------------------------------------------------------------------------

    def _arm_at(self, when: float) -> None:
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """Check the deadline that applies now; act on it, or re-arm (at most one tick ahead).

        Re-arming no further than the shortest timeout ahead keeps the invariant that the timer fires
        no later than any deadline a state change can set, so state changes never touch the timer.
        """
        self._timer = None
        if self._closing and not self._lingering:
            return
        now = _clock()
        due, kind = self._deadline()
        if due <= now + 0.001:  # uvloop's timers are 1 ms grained and may fire a fraction early
            self._expire(kind)
        else:
            self._arm_at(min(due, now + self._tick))

    def _deadline(self) -> tuple[float, int]:
        if self._lingering:
            return self._linger_t0 + LINGER, _T_LINGER
        if self._gate.paused:  # the client is not taking what is written for it, answer or not
            taken = bytes_taken(self._written, self._transport, self._fd)
            if taken > self._taken:  # it reads, if slowly: the timeout counts from its last bytes
                self._taken, self._paused_at = taken, _clock()
            return self._paused_at + self._limits.send_timeout, _T_SEND
        ex = self._active
        if ex is not None:
            if not ex.body_complete and not self._pause:  # the app waits for body bytes
                return self._last_rx + self._limits.body_timeout, _T_BODY
            return _INF, _T_NONE  # the app is answering: its own business
        if self._in_head and self._cur is not None:
            return self._cur.t_start + self._limits.head_timeout, _T_HEAD
        return self._idle_t0 + self._limits.idle_timeout, _T_IDLE

    def _expire(self, kind: int) -> None:
        if kind == _T_SEND:
            _log.warning("HTTP client %s took no bytes for %g s: aborted",
                         self._transport.get_extra_info("peername"), self._limits.send_timeout)  # fmt: skip
            ex = self._active
            self._active = None
            self._close(linger=False)  # abort: its unread bytes go now, not when it reads them
            if ex is not None and not ex.finished and not ex._gone:
                ex._lose(RequestError(408, "send_timeout", "the client stopped reading the answer"))
            return
        if kind == _T_BODY:
            self._broken = True
            err = RequestError(408, "request_timeout", "the request body stalled")
            self._fail_active(cast(Exchange, self._active), err)
        elif kind == _T_HEAD:
            self._broken = True
            self._send_reject(RequestError(408, "request_timeout", "the request head was not received in time"))
        else:  # idle keep-alive, or lingering over
            self._closing = self._broken = True
            self._transport.close()


def _asks_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an `Upgrade` field lists `websocket` (RFC 9110 §7.8: a comma-separated list, any case)."""
    for name, value in headers:
        if name == b"upgrade" and any(p.strip().lower() == b"websocket" for p in value.split(b",")):
            return True
    return False


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    limits: HttpLimits = _DEFAULT_LIMITS,
    *,
    server_header: bytes = b"casola",
    **kw: Any,
) -> asyncio.Server:
    """Listen for HTTP/1.1 on host:port (0 picks a free port).

    Args:
        handler: called with each `Exchange` when its head is complete (a plain function).
        host, port: where to listen.
        limits: per-connection limits and timeouts.
        server_header: the `Server:` value (b"" sends none).
        **kw: passed on to `loop.create_server` (backlog, reuse_port, ssl, ...).

    Returns:
        The listening server; close it with `server.close()` and `await server.wait_closed()`.

    Raises:
        OSError: the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: HttpProtocol(handler, limits, server_header=server_header), host, port, reuse_address=True, **kw
    )
