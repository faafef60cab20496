"""`POST /v1/run/{model}`: one HTTP exchange joined to one upstream stream, both ways streamed.

Request: the body goes upstream as it arrives (a small body travels as one REQUEST frame with
FLAG_END; a large one as REQUEST + DATA* + END, never joined). Request metadata comes from headers:
`X-Casola-Param-<name>` (model parameters), `X-Casola-Deadline-Ms`, `Content-Type`, `X-Region`.

Response: the HTTP status is committed at the first answer byte, not at the worker's response head,
so a worker that fails before producing any byte still yields a clean 502 + `x-should-retry`. A
one-frame answer goes out with Content-Length and the complete Server-Timing header; a streamed one
is chunked, its header carries what is known at the first byte and the totals follow in a
`Server-Timing` trailer (declared with `Trailer: server-timing`). An error after the first byte
aborts the chunked body (no terminating chunk), so no client mistakes it for a complete answer.
Except for `text/event-stream`: SSE clients (browsers' EventSource, OpenAI's SDKs) reconnect or
report a bare "connection lost" on a cut stream, so there the error goes out as a last event,
`event: error` with the error envelope as `data`, and the body then ends normally.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import TYPE_CHECKING

from casola.ingress.envelope import error_body
from casola.ingress.fields import BadField, field_name, field_value
from casola.ingress.http import Exchange
from casola.ingress.timing import server_timing
from casola.ingress.upstream import Upstream
from casola.net.link import LinkBase
from casola.wire import (
    DEFAULT_LIMITS,
    FLAG_END,
    Buffer,
    EndMeta,
    ErrorCode,
    ErrorMeta,
    Frame,
    FrameType,
    RequestMeta,
    ResponseMeta,
    error_info,
    error_name,
)

if TYPE_CHECKING:
    from casola.ingress.admission import Ticket
    from casola.ingress.server import Ingress

__all__ = ["OPEN_AT", "SLOW_CLIENT_MAX", "RunExchange", "error_headers", "send_wire_error", "unread_max"]

OPEN_AT = 64 * 1024  # buffer a body up to this before opening the stream: small requests = 1 frame
# A streamed answer is pushed as the worker produces it; frames have no per-stream byte credit
# (SPEC §7.3), so a client that reads slower than the worker writes, or not at all, has its answer
# buffered here. Past `unread_max(max_body)` unread bytes (one whole answer of the largest body,
# plus a frame), or after `send_timeout` without taking a byte, the stream is cancelled upstream
# (the worker's slot frees) and the connection aborted, its buffers dropped.
SLOW_CLIENT_MAX = 32 * 1024 * 1024


def unread_max(max_body: int) -> int:
    """Bytes a client may leave unread before it is dropped: a whole answer as large as the largest
    request body crosses to a client slower than its worker (SPEC §8: bodies up to the limit cross
    every hop both ways), and never less than SLOW_CLIENT_MAX."""
    return max(SLOW_CLIENT_MAX, max_body + DEFAULT_LIMITS.max_payload)


log = logging.getLogger("casola.ingress")
_OCTET = "application/octet-stream"
_SSE = "text/event-stream"
_EVENT_END = b"\n\n"  # a blank line ends an SSE event (the LF form; what SSE servers write)
Header = tuple[bytes, bytes]
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "trailer", "upgrade"})
_RESPONSE, _DATA, _END, _ERROR = FrameType.RESPONSE, FrameType.DATA, FrameType.END, FrameType.ERROR


def send_wire_error(
    ex: Exchange, code: int, message: str, retry_after_ms: int = 0, param: str = "", extra: Sequence[Header] = ()
) -> int:
    """Answer with a wire error code in the envelope: its HTTP status and type from the one error
    table, its name as `code`, the retry hints. Returns the status sent."""
    info = error_info(code)
    headers = error_headers(code, retry_after_ms)
    headers += extra
    ex.send_error(info.http, message, info.type, error_name(code).lower(), param or None, headers)
    return info.http


def error_headers(code: int, retry_after_ms: int) -> list[tuple[bytes, bytes]]:
    """Retry hints: `x-should-retry` (what OpenAI's SDKs read) and `Retry-After` in seconds."""
    info = error_info(code)
    out = [(b"x-should-retry", b"true" if info.retryable else b"false")]
    if retry_after_ms or info.http in (429, 503):
        out.append((b"retry-after", str(max(1, math.ceil(retry_after_ms / 1000))).encode()))
    return out


class RunExchange:
    """One native run request in flight; the upstream's `Sink` for its stream."""

    __slots__ = (
        "buf",
        "buffered",
        "committed",
        "done",
        "ex",
        "ing",
        "link",
        "meta",
        "model",
        "rmeta",
        "sid",
        "sse",
        "t0",
        "t_answer",
        "t_head",
        "t_sent",
        "tail",
        "ticket",
        "trace",
    )

    def __init__(
        self, ing: Ingress, ex: Exchange, link: LinkBase, meta: RequestMeta, trace: bool, ticket: Ticket
    ) -> None:
        self.ing, self.ex, self.link, self.meta, self.trace = ing, ex, link, meta, trace
        self.ticket = ticket  # its place at the ingress (casola.ingress.admission), given back once
        self.model = meta.model
        # `ingress` counts from the first byte of the request head (parse, auth and routing are
        # ingress time): the parser's clock reading, time.monotonic(), which perf_counter() also
        # reads on Linux (casola/ingress/http.py).
        self.t0 = ex.t_start
        self.buf: list[bytes] = []
        self.buffered = 0
        self.sid = 0
        self.t_sent = self.t_answer = 0.0
        self.t_head = 0.0  # when the answer's head (RESPONSE) arrived
        self.rmeta: ResponseMeta | None = None
        self.committed = False
        self.done = False
        self.sse = False  # the committed answer is text/event-stream
        self.tail = b""  # sse: the body's last two bytes, to tell whether it ends between events
        ex.on_body, ex.on_body_end, ex.on_abort = self.on_body, self.on_body_end, self.on_abort

    # -- request body -> upstream -------------------------------------------------------------------

    def on_body(self, chunk: bytes) -> None:
        if self.sid:
            Upstream.send_body(self.link, self.sid, chunk, False)
            self._backpressure()
            return
        self.buf.append(chunk)
        self.buffered += len(chunk)
        if self.buffered >= OPEN_AT:
            self._open(end=False)

    def on_body_end(self) -> None:
        if self.sid:
            Upstream.send_body(self.link, self.sid, b"", True)
        elif not self.done:
            self._open(end=True)

    def _open(self, end: bool) -> None:
        buf = self.buf
        payload = buf[0] if len(buf) == 1 else b"".join(buf)  # joins only bodies below OPEN_AT
        self.buf = []
        if not self.link.is_up or self.link.conn.send_credit <= 0:
            self._error(ErrorCode.OVERLOADED, "the queue node is not taking more requests", 1000)
            return
        self.t_sent = perf_counter()
        self.sid = self.ing.upstream.open(
            self.link, Frame(FrameType.REQUEST, 0, self.meta, payload, FLAG_END if end else 0), self
        )
        if not end:
            self._backpressure()

    def _backpressure(self) -> None:
        if self.link.gate.paused:
            self.ex.pause_body()
            self.ing.loop.create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        try:
            await self.link.drain()
        except ConnectionError:
            return
        self.ex.resume_body()

    def on_abort(self, exc: BaseException | None) -> None:
        if not self.done:
            self.done = True
            if self.sid:
                Upstream.cancel(self.link, self.sid)
            self.ing.finished(self, 499, None, 0.0)

    # -- upstream answer -> HTTP ----------------------------------------------------------------------

    def on_frame(self, frame: Frame, t: float) -> None:
        if self.done:
            return
        ft = frame.type
        if ft is _RESPONSE:
            self.t_answer = self.t_head = t
            self.rmeta = frame.meta  # type: ignore[assignment]
            if frame.flags & FLAG_END:
                self._respond_whole(frame.payload, self.rmeta.timing)  # type: ignore[union-attr]
            elif len(frame.payload) and self._commit(t):
                self._write(frame.payload)
        elif ft is _DATA:
            if not self.committed and not self._commit(t):
                return
            if self.sse:
                self._write(frame.payload)
            else:
                self.ex.write(frame.payload)
            if frame.flags & FLAG_END:
                self._finish_stream(t, None)
            elif self.ex.writing_paused and self.ex.write_buffered > self.ing.unread_max:
                self._drop_slow_client()
        elif ft is _END:
            meta = frame.meta
            assert isinstance(meta, EndMeta)
            if not self.committed:
                self.t_answer = t
                self._respond_whole(frame.payload, meta.timing)
            else:
                if len(frame.payload):
                    self._write(frame.payload)
                self._finish_stream(t, meta.timing, meta.trailers)
        elif ft is _ERROR:
            meta = frame.meta
            assert isinstance(meta, ErrorMeta)
            self.t_answer = t
            self._error(meta.code, meta.message, meta.retry_after_ms, meta.param, meta.timing)

    def _drop_slow_client(self) -> None:
        unread = self.ex.write_buffered
        log.warning(
            "%s: client not reading (%d bytes unread); cancelling",
            self.model,
            unread,
            extra={"request_id": self.ex.request_id},
        )
        self.done = True
        Upstream.cancel(self.link, self.sid, "the client stopped reading")
        self.ex.abort()
        self.ing.finished(self, 499, None, 0.0)

    def on_reset(self, code: int, message: str) -> None:
        if not self.done:
            self._error(code, message, 0)

    def upload_s(self, now: float) -> float:
        """Time the client took to send its body after its head: the client's, not ours (`upload`)."""
        ex = self.ex
        d = (ex.t_body or now) - ex.t_head
        return d if d > 0.0 else 0.0

    def _stages(self, now: float, upstream: Mapping[str, float] | None) -> bytes:
        """The Server-Timing value at `now`: upload, ingress, then the queue node's stages."""
        upload = self.upload_s(now)
        return server_timing(self._ingress_ms(now, upload), upstream or {}, upload * 1000)

    def _ingress_ms(self, now: float, upload: float | None = None) -> float:
        """Our own residence: from the head's first byte, less the client's upload and the time the
        queue node had the request (counted from when its body was complete: before that, the
        node's stages are the client's upload too)."""
        t = (now - self.t0) - (self.upload_s(now) if upload is None else upload)
        if sent := self.t_sent:
            body = self.ex.t_body
            waited = self.t_answer - (sent if sent > body else body)
            if waited > 0.0:
                t -= waited
        return t * 1000 if t > 0.0 else 0.0

    def _content_type(self) -> str:
        meta = self.rmeta
        return (meta.content_type if meta is not None else "") or self.meta.content_type or _OCTET

    def _headers(self, timing: dict[str, float] | None, now: float) -> list[tuple[bytes, bytes]]:
        """The answer's head. Raises BadField: the worker's content type or one of its headers
        cannot be written (control characters, a name that is not a token)."""
        meta = self.rmeta
        headers = [(b"content-type", field_value(self._content_type(), "the answer's content type"))]
        if meta is not None and meta.headers:
            for k, v in meta.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    headers.append((field_name(k), field_value(v, f"the answer's header {k!r}")))
        if self.trace:
            headers.append((b"server-timing", self._stages(now, timing)))
        return headers

    def _respond_whole(self, payload: bytes | bytearray | memoryview, timing: dict[str, float]) -> None:
        now = perf_counter()
        try:
            headers = self._headers(timing, now)
        except BadField as exc:
            return self._unsendable(exc)
        self.ex.respond(200, headers, payload)
        self.committed = self.done = True
        self.ing.finished(self, 200, timing, self._ingress_ms(now))

    def _commit(self, t: float) -> bool:
        """Send the head of a streamed answer at its first byte (which arrived at `t`); False when it
        could not be (the client got 502). The head's Server-Timing is what is known at that byte:
        the wait between the worker's response head and its first body byte is the worker's
        (`worker-rtt` runs to the first byte here, to the last in the trailer), not the ingress's."""
        self.sse = self._content_type().partition(";")[0].strip().lower() == _SSE
        timing = self.rmeta.timing if self.rmeta is not None else None
        if timing and t > self.t_head and "worker-rtt" in timing:
            timing = {**timing, "worker-rtt": timing["worker-rtt"] + (t - self.t_head) * 1000}
        self.t_answer = t
        trailers = (b"server-timing",) if self.trace else ()
        try:
            headers = self._headers(timing, perf_counter())
        except BadField as exc:
            self._unsendable(exc)
            return False
        self.ex.start(200, headers, trailers=trailers)
        self.committed = True
        return True

    def _unsendable(self, exc: BadField) -> None:
        """The worker's answer cannot become an HTTP response: this request fails (502), nothing else."""
        log.warning("%s: %s; answering 502", self.model, exc, extra={"request_id": self.ex.request_id})
        Upstream.cancel(self.link, self.sid, "the answer cannot be sent over HTTP")
        self._error(ErrorCode.WORKER_FAILED, f"the worker's answer cannot be sent over HTTP: {exc}", 0)

    def fail(self, exc: BaseException) -> None:
        """Handling this stream's answer raised (a bug, contained to this request: the upstream
        routes it here): the client gets an error answer, or a cut one if its answer had started."""
        if not self.done:
            self._error(ErrorCode.INTERNAL, "internal error while relaying the answer", 0)
        elif not self.ex.finished:
            self.ex.abort()

    def _write(self, payload: Buffer) -> None:
        """A body write after the commit that also keeps the SSE tail."""
        self.ex.write(payload)
        if self.sse and len(payload):
            self.tail = (self.tail + bytes(payload[-2:]))[-2:]

    def _finish_stream(self, t: float, timing: dict[str, float] | None, more: Mapping[str, str] | None = None) -> None:
        self.done = True
        self.t_answer = t
        now = perf_counter()
        ingress_ms = self._ingress_ms(now)
        trailers = [(b"server-timing", self._stages(now, timing))] if self.trace else []
        if more:  # the answer's own (a workflow's timeline): names and values as the wire limits them
            trailers += _trailers(more)
        self.ex.end(trailers)
        self.ing.finished(self, 200, timing, ingress_ms)

    def _error(
        self, code: int, message: str, retry_after_ms: int, param: str = "", timing: dict[str, float] | None = None
    ) -> None:
        self.done = True
        now = perf_counter()
        if self.committed:
            status = error_info(code).http
            if self.sse:
                self._sse_error(code, message, param, timing, now)
            else:
                self.ex.abort()  # mid-stream: truncate, never fake a complete answer
        else:
            extra = [(b"server-timing", self._stages(now, timing))] if self.trace else []
            status = send_wire_error(self.ex, code, message, retry_after_ms, param, extra)
        self.ing.finished(self, status, timing, self._ingress_ms(now))

    def _sse_error(self, code: int, message: str, param: str, timing: dict[str, float] | None, now: float) -> None:
        """End an SSE answer with `event: error` (the envelope an HTTP error would carry) and a complete
        chunked body: the event is what tells the client, so nothing may follow it."""
        body = error_body(message, error_info(code).type, error_name(code).lower(), param or None)
        # An event the worker left half-written is ended first, so it cannot swallow the error's fields.
        sep = b"" if self.tail in (b"", _EVENT_END) else _EVENT_END
        self.ex.write(b"%bevent: error\ndata: %b\n\n" % (sep, body))
        trailers = [(b"server-timing", self._stages(now, timing))] if self.trace else []
        self.ex.end(trailers)


def _trailers(fields: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """An answer's own trailer fields as HTTP trailers; one that is not a valid field is left out."""
    out = []
    for name, value in fields.items():
        try:
            out.append((field_name(name), field_value(value, f"trailer {name}")))
        except BadField:
            log.warning("an answer's trailer %r is not a valid HTTP field; not sent", name[:80])
    return out
