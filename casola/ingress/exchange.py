"""One HTTP/1.1 request and its response on one connection: the object the app layer works with.

`HttpProtocol` (casola/ingress/http.py) parses; an `Exchange` carries the parsed head to the app, pushes
the request body to the app's callbacks (buffering until they are set or while the app has paused),
and frames the response: status line and headers as one joined `bytes`, Content-Length or chunked
body, trailers, HEAD and 204/304 without a body. Writes go straight to the transport; large payloads
are never concatenated (`writelines([size_line, data, CRLF])`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from casola.ingress.accesslog import ACCESS, log_access
from casola.ingress.envelope import JSON_CT, error_body
from casola.ingress.fields import VISIBLE, BadField

if TYPE_CHECKING:
    from asyncio import BaseProtocol

    from casola.ingress.http import HttpProtocol

__all__ = ["Exchange", "error_response"]

_log: Final = logging.getLogger("casola.ingress")

Buffer = bytes | bytearray | memoryview

# Response body modes. _DROP: nothing more goes out (HEAD, 204/304, finished, aborted).
_IDLE: Final = 0
_DROP: Final = 1
_LENGTH: Final = 2
_CHUNKED: Final = 3
_RAW: Final = 4  # HTTP/1.0 client, no length given: the body ends when the connection closes

# Bodies up to this size are joined to the head / chunk framing and sent with one write(); bigger ones
# go out with writelines() so the payload itself is never copied. 4 KiB: a memcpy of that size costs
# less than the extra iovec bookkeeping (asyncio on 3.11 joins in writelines anyway).
_JOIN_MAX: Final = 4096
_CLIENT_GONE: Final = 499  # the access log's status for an answer the client did not wait for (nginx's)

_STATUS: Final[dict[int, bytes]] = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE: Final = b"Connection: close\r\n"
_KEEP: Final = b"Connection: keep-alive\r\n"
_CHUNKED_TE: Final = b"Transfer-Encoding: chunked\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"

_date_next = 0.0
_date_line = b""


def date_line() -> bytes:
    """The `Date:` header line, formatted at most once per second (RFC 9110 §6.6.1)."""
    global _date_next, _date_line
    now = time.time()
    if now >= _date_next:
        sec = int(now)
        _date_next = sec + 1.0
        _date_line = b"Date: " + formatdate(sec, usegmt=True).encode() + b"\r\n"
    return _date_line


def _status_line(status: int) -> bytes:
    return _STATUS.get(status) or b"HTTP/1.1 %d \r\n" % status  # an unknown code: empty reason phrase


def error_response(status: int, message: str, code: str, server_line: bytes, *, head_only: bool = False) -> bytes:
    """A complete error response with the JSON envelope, closing the connection (the edge's own errors).

    Args:
        status: the HTTP status; "type" is "server_error" for 5xx except 501, else "invalid_request_error".
        message: the envelope's message.
        code: the envelope's code, e.g. "headers_too_large".
        server_line: the pre-encoded `Server:` line (may be empty).
        head_only: leave the body out (the request was HEAD); Content-Length stays.

    Returns:
        The bytes to write.

    Raises:
        Nothing.
    """
    kind = "server_error" if status >= 500 and status != 501 else "invalid_request_error"
    body = error_body(message, kind, code)
    head = b"".join(
        [
            _status_line(status),
            b"Content-Type: ",
            JSON_CT,
            b"\r\nContent-Length: %d\r\n" % len(body),
            _CLOSE,
            server_line,
            date_line(),
            b"\r\n",
        ]
    )
    return head if head_only else head + body


class Exchange:
    """One request and its response on one connection.

    The handler gets it when the request head is complete. To receive the body the handler sets
    `on_body` / `on_body_end` (and `on_abort`) before it returns; chunks that arrived earlier are
    delivered as soon as they are set. The response goes out with `start`/`write`/`end`, or in one go
    with `respond`/`send_error`. After the exchange is aborted (client gone, timeout, `abort()`),
    response calls are silently ignored.

    Attributes:
        method: e.g. b"POST". path: the raw path without the query. query: the raw query, b"" if none.
        headers: (name, value) pairs in order; names lower-cased, values stripped.
        t_start: the loop's clock (time.monotonic(), asyncio's loop.time()) at the read that carried the
            request's first byte; t_head, t_body: at the read that completed its head, its body.
        body_complete: the whole request body has arrived.
        started, finished: the response head went out; the response ended.
        request_id: the request's id (`X-Request-Id`), set by the app before it answers.
        common: header lines (CRLF-ended) every answer to this request carries (the app's: the
            request id, CORS), b"" for none.
        upgrade: b"websocket" for a WebSocket upgrade request (answer it normally to refuse it, or
            with `switch_protocols`), else b"".
    """

    __slots__ = tuple(
        "_buf _close _delivering _end_sent _expect _gone _http10 _keep_alive _lost _lost_exc _mode _on_abort "
        "_on_body _on_body_end _out_left _paused _proto _ready _rx body_complete common finished headers method "
        "path query request_id started status t_body t_head t_start upgrade".split()
    )

    def __init__(self, proto: HttpProtocol, t_start: float) -> None:
        self.method = b""
        self.path = b""
        self.query = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.t_start = t_start
        self.t_head = t_start  # when the head was complete (set by the parser)
        self.t_body = 0.0  # when the body was complete (0.0: not yet)
        self.body_complete = False
        self.request_id = ""
        self.common = b""
        self.status = 0  # of the answer, once started
        self.started = False
        self.finished = False
        self.upgrade = b""
        self._proto = proto
        self._on_body: Callable[[bytes], None] | None = None
        self._on_body_end: Callable[[], None] | None = None
        self._on_abort: Callable[[BaseException | None], None] | None = None
        self._buf: deque[bytes] | None = None  # body chunks not yet handed to the app
        self._paused = False  # the app called pause_body()
        self._ready = False  # dispatched and the handler has returned: chunks may go straight out
        self._delivering = False
        self._end_sent = False
        self._gone = False  # aborted: connection lost, timed out, rejected mid-body, or abort()
        self._lost = 0  # 0: not lost; 1: lost, on_abort not called yet; 2: on_abort called
        self._lost_exc: BaseException | None = None
        self._rx = 0  # body bytes received
        self._expect = False  # Expect: 100-continue and 100 not sent yet
        self._keep_alive = True
        self._http10 = False
        self._close = False
        self._mode = _IDLE
        self._out_left = 0

    # -- request -----------------------------------------------------------------------------

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (given lower-case), or None. Raises nothing."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def on_body(self) -> Callable[[bytes], None] | None:
        """Called with each body chunk (the bytes objects httptools gives, never joined)."""
        return self._on_body

    @on_body.setter
    def on_body(self, cb: Callable[[bytes], None] | None) -> None:
        self._on_body = cb
        if self._ready and self._buf:
            self._deliver()

    @property
    def on_body_end(self) -> Callable[[], None] | None:
        """Called once the whole body has arrived and every chunk was delivered (also for no body)."""
        return self._on_body_end

    @on_body_end.setter
    def on_body_end(self, cb: Callable[[], None] | None) -> None:
        self._on_body_end = cb
        if self._ready and self.body_complete and not self._end_sent:
            self._deliver()

    @property
    def on_abort(self) -> Callable[[BaseException | None], None] | None:
        """Called once if the client goes away or times out before the response ended."""
        return self._on_abort

    @on_abort.setter
    def on_abort(self, cb: Callable[[BaseException | None], None] | None) -> None:
        self._on_abort = cb
        if self._lost == 1 and cb is not None:  # it happened before the app was listening
            self._fire_abort(self._lost_exc)

    @property
    def writing_paused(self) -> bool:
        """True while the transport's write buffer is above write_high (then `await drain()`)."""
        return self._proto._gate.paused

    @property
    def write_buffered(self) -> int:
        """Response bytes accepted but not yet taken by the client (the transport's write buffer)."""
        t = self._proto._transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()

    def pause_body(self) -> None:
        """Stop reading the socket; no `on_body` call happens until `resume_body()`. Idempotent; raises nothing."""
        if not self._paused:
            self._paused = True
            self._proto._body_paused(self, True)

    def resume_body(self) -> None:
        """Deliver what was buffered and read the socket again. Idempotent.

        Raises:
            Nothing: an exception from the app's own callbacks is logged and answered with 500 or abort.
        """
        if self._paused:
            self._paused = False
            self._proto._body_paused(self, False)
            if self._ready and (self._buf or self.body_complete):
                self._deliver()

    def _deliver(self) -> None:
        """Hand buffered chunks, then the end, to the app while it listens and is not paused."""
        if self._delivering:
            return  # re-entered from an app callback; the outer loop carries on
        self._delivering = True
        n = 0
        try:
            buf = self._buf
            while buf and not self._paused and not (self._gone or self.finished):
                if (cb := self._on_body) is None:
                    break
                chunk = buf.popleft()
                n += len(chunk)
                cb(chunk)
            if not buf and self.body_complete and not (self._end_sent or self._paused or self._gone or self.finished):
                if (end := self._on_body_end) is not None:
                    self._end_sent = True
                    end()
        except Exception as exc:
            self._proto._app_failed(self, exc)
        finally:
            self._delivering = False
            if n:
                self._proto._unbuffered(n)

    def _lose(self, exc: BaseException | None) -> None:
        """The exchange died under the app (client gone, timeout, bad body): drop its output, tell it."""
        self._gone = True
        self._mode = _DROP
        if ACCESS.isEnabledFor(logging.INFO):
            self._access(_CLIENT_GONE)
        self._fire_abort(exc)

    def _access(self, status: int) -> None:
        """The access-log line of this exchange (casola/ingress/accesslog.py; callers check that the
        log is on: one call fewer per request when it is off)."""
        peer = self._proto._transport.get_extra_info("peername")
        log_access(
            self.method,
            self.path,
            status,
            time.monotonic() - self.t_start,
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "",
            request_id=self.request_id,
        )

    def _fire_abort(self, exc: BaseException | None) -> None:
        if self._lost == 2:
            return
        self._lost, self._lost_exc = 1, exc
        if (cb := self._on_abort) is not None:
            self._lost = 2
            try:
                cb(exc)
            except Exception:
                _log.exception("on_abort callback failed")

    # -- response ----------------------------------------------------------------------------

    def _prepare(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], length: int | None, trailers: Sequence[bytes]
    ) -> bytes | None:
        """Build the response head and pick the body mode; None when the exchange is gone."""
        if self._gone or self.finished:
            return None
        if self.started:
            raise RuntimeError("the response has already started")
        if status < 200:
            raise ValueError(f"interim status {status} cannot start a response")
        self.started = True
        self.status = status
        close = self._close or not self._keep_alive
        if self._expect and not self.body_complete:
            close = True  # the client waits for 100 before sending the body: it will never come
        parts = [_STATUS.get(status) or _status_line(status)]
        add = parts.append
        for name, value in headers:
            if value.translate(None, VISIBLE) or name.translate(None, VISIBLE):
                # The last guard against response splitting: callers check outside values with
                # casola.ingress.fields first; one that did not is a bug, and nothing is written.
                self.started = False
                raise BadField(f"header {bytes(name)[:40]!r}: a value with CR, LF or other control bytes")
            add(name)
            add(b": ")
            add(value)
            add(b"\r\n")
        if status == 204 or status == 304:
            mode = _DROP  # RFC 9110 §8.6: no Content-Length on 204, no body on either
        elif length is not None:
            mode, self._out_left = _LENGTH, length
            add(b"Content-Length: %d\r\n" % length)
        elif self._http10:
            mode, close = _RAW, True  # no chunked in HTTP/1.0: the close ends the body
        else:
            mode = _CHUNKED
            add(_CHUNKED_TE)
            if trailers:
                add(b"Trailer: " + b", ".join(trailers) + b"\r\n")
        if close:
            add(_CLOSE)
        elif self._http10:
            add(_KEEP)
        add(self.common)
        add(self._proto._server_line)
        add(date_line())
        add(b"\r\n")
        self._close = close
        self._mode = _DROP if self.method == b"HEAD" else mode
        return b"".join(parts)

    def start(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        content_length: int | None = None,
        trailers: Sequence[bytes] = (),
    ) -> None:
        """Write the status line and headers.

        Args:
            status: the final status (>= 200).
            headers: (name, value) pairs as sent; never Content-Length, Transfer-Encoding, Connection, Date.
            content_length: the body size; None sends a chunked body (close-delimited for HTTP/1.0).
            trailers: names announced in `Trailer:` for a chunked body; their values go to `end()`.

        Raises:
            RuntimeError: the response has already started.
            ValueError: status < 200; BadField (a ValueError): a header with control bytes (nothing
                was written).
        """
        head = self._prepare(status, headers, content_length, trailers)
        if head is not None:
            self._proto.write(head)

    def write(self, data: Buffer) -> None:
        """Send body bytes (one chunk when chunked). Ignored after the exchange ended or was aborted.

        Raises:
            RuntimeError: called before `start()`, or more bytes than the Content-Length given.
        """
        mode = self._mode
        if mode == _CHUNKED:
            n = len(data)
            if n > _JOIN_MAX:
                self._proto.writelines([b"%x\r\n" % n, data, b"\r\n"], n)
            elif n:  # an empty chunk would end the body
                self._proto.write(b"%x\r\n%b\r\n" % (n, data))  # type: ignore[str-format]  # %b takes any buffer
        elif mode == _LENGTH:
            left = self._out_left - len(data)
            if left < 0:
                raise RuntimeError("body longer than the Content-Length given")
            self._out_left = left
            self._proto.write(data)
        elif mode == _RAW:
            self._proto.write(data)
        elif mode == _IDLE and not self._gone:
            raise RuntimeError("write() before start()")

    def end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Finish the response (chunked: last chunk and trailer fields); the next request may start.

        Raises:
            RuntimeError: called before `start()`.
        """
        if self._gone or self.finished:
            return
        mode = self._mode
        if mode == _IDLE:
            raise RuntimeError("end() before start()")
        if mode == _CHUNKED:
            if trailers:
                fields = [b"%s: %s\r\n" % tv for tv in trailers]
                self._proto.write(b"".join([b"0\r\n", *fields, b"\r\n"]))
            else:
                self._proto.write(_LAST_CHUNK)
        elif mode == _LENGTH and self._out_left:
            _log.warning("response ended %d bytes short of its Content-Length; closing", self._out_left)
            self._close = True
        self._finish()

    def respond(self, status: int, headers: Sequence[tuple[bytes, bytes]], body: Buffer = b"") -> None:
        """Send a whole response with a Content-Length in one transport write.

        Raises:
            RuntimeError: the response has already started.
            ValueError: status < 200; BadField: a header with control bytes (nothing was written).
        """
        head = self._prepare(status, headers, len(body), ())
        if head is None:
            return
        proto = self._proto
        if self._mode == _DROP or not body:
            proto.write(head)
        elif len(body) <= _JOIN_MAX:
            proto.write(head + body)
        else:
            proto.writelines([head, body], len(head) + len(body))
        self._finish()

    def send_error(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """`respond()` with OpenAI's error envelope as application/json.

        Raises:
            RuntimeError: the response has already started.
        """
        hdrs = [(b"Content-Type", JSON_CT), *headers]
        self.respond(status, hdrs, error_body(message, type, code, param))

    def not_allowed(self, allow: bytes) -> None:
        """405 with `Allow` (RFC 9110 §15.5.6): the route exists, the method is not one it takes;
        `allow` lists those it does, e.g. b"GET, HEAD"."""
        where = f"{self.method.decode('latin-1')} is not allowed on {self.path.decode('latin-1')}"
        self.send_error(405, f"{where}: use {allow.decode()}", "invalid_request_error", "method_not_allowed",
                        None, [(b"allow", allow)])  # fmt: skip

    def switch_protocols(self, headers: Sequence[tuple[bytes, bytes]], protocol: BaseProtocol) -> bool:
        """Accept the upgrade this request asks for: write `101 Switching Protocols` with `headers`
        (and the common ones), then hand the connection to `protocol` (`transport.set_protocol`,
        `connection_made`, then `data_received` with any bytes that came after the request head).
        The exchange is finished; no access-log line is written for it (the new protocol's, at its end).

        Returns:
            False when the exchange is already gone (the client left): nothing was written.

        Raises:
            RuntimeError: the request asked for no upgrade, or its answer has started.
            BadField: a header with control bytes (nothing was written).
        """
        if not self.upgrade:
            raise RuntimeError("switch_protocols() on a request that asked for no upgrade")
        if self._gone or self.finished:
            return False
        if self.started:
            raise RuntimeError("the response has already started")
        parts = [_STATUS[101]]
        for name, value in headers:
            if value.translate(None, VISIBLE) or name.translate(None, VISIBLE):
                raise BadField(f"header {bytes(name)[:40]!r}: a value with CR, LF or other control bytes")
            parts += (name, b": ", value, b"\r\n")
        parts += (self.common, self._proto._server_line, date_line(), b"\r\n")
        self.started = self.finished = True
        self.status = 101
        self._mode = _DROP
        self._proto.write(b"".join(parts))
        self._proto._switch(self, protocol)
        return True

    def abort(self) -> None:
        """Give up on the response: close the connection without ending the body (the client sees it
        truncated). Idempotent; ignored once the response has ended. Raises nothing."""
        if self._gone or self.finished:
            return
        self._gone = True
        self._mode = _DROP
        if ACCESS.isEnabledFor(logging.INFO):
            self._access(self.status if self.started else _CLIENT_GONE)
        self._proto._close(linger=False)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above write_high.

        Raises:
            ConnectionError: the connection is gone or the exchange was aborted.
        """
        if self._gone:
            raise ConnectionResetError("the exchange was aborted")
        await self._proto._gate.wait()

    def _finish(self) -> None:
        if ACCESS.isEnabledFor(logging.INFO):
            self._access(self.status)
        self.finished = True
        self._mode = _DROP
        self._proto._response_done(self)

    def _write_continue(self) -> None:
        self._expect = False
        self._proto.write(_CONTINUE)
