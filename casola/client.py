"""An asyncio client speaking casola frames to an ingress's raw-frame listener (SPEC.md).

    client = await Client.connect("127.0.0.1:7700", api_key)
    result = await client.run("echo", b"hello")          # whole answer
    async with client.stream("echo", b"hi", params={"chunks": 3}) as s:
        async for chunk in s:                            # answer pieces as they are produced
            ...
    s.timing  # the same stage figures as HTTP's Server-Timing (ingress, queue-overhead, ...)

Errors come back as `RequestFailed` with the wire code, whether it may be retried, and Retry-After.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from ssl import SSLContext
from time import perf_counter
from types import TracebackType

from casola.jobview import JobView, decode_view
from casola.net.errors import ConnectionLost
from casola.net.handshake import dial_tcp
from casola.net.link import EventHandler, LinkBase, LostHandler
from casola.wire import (
    DEFAULT_LIMITS,
    FLAG_END,
    Buffer,
    CasolaError,
    ConnectionTerminated,
    EndMeta,
    ErrorCode,
    ErrorMeta,
    Event,
    Frame,
    FrameType,
    HelloMeta,
    Limits,
    RequestMeta,
    ResponseMeta,
    StreamReset,
    error_info,
    error_name,
)
from casola.wire.meta import Param

__all__ = ["Client", "RequestFailed", "Result", "Stream"]

CHUNK = 1024 * 1024  # request bodies are sent in frames of at most this size


class RequestFailed(CasolaError):
    def __init__(self, code: int, message: str, retry_after_ms: int = 0, timing: dict[str, float] | None = None):
        super().__init__(f"{error_name(code)}: {message}")
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms
        self.retryable = error_info(code).retryable
        self.timing = timing or {}


class Result:
    __slots__ = ("content_type", "headers", "payload", "timing")

    def __init__(self, payload: bytes, content_type: str, headers: dict[str, str], timing: dict[str, float]) -> None:
        self.payload, self.content_type, self.headers, self.timing = payload, content_type, headers, timing


class Stream:
    """One request's answer, piece by piece. Iterate it; then `timing` holds the totals."""

    def __init__(self, client: Client, sid: int) -> None:
        self._client, self.sid = client, sid
        self.head: ResponseMeta | None = None
        self.timing: dict[str, float] = {}
        self.trailers: dict[str, str] = {}  # the END's (a workflow's timeline, ...)
        self._items: list[Buffer] = []
        self.t_first = 0.0  # perf_counter() when the first answer bytes arrived (0: none yet)
        self._ended = False
        self._error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None
        # Called once, as the last frame (END, ERROR, a reset, the link's loss) arrives: a caller
        # timing the request sees its end when it happens, not when it has read the last piece.
        self.on_done: Callable[[], None] | None = None

    def _push(self, frame: Frame) -> None:
        ft, meta = frame.type, frame.meta
        if ft is FrameType.RESPONSE:
            assert isinstance(meta, ResponseMeta)
            self.head, self.timing = meta, dict(meta.timing)
        elif ft is FrameType.END:
            assert isinstance(meta, EndMeta)
            self.timing.update(meta.timing)
            self.trailers = dict(meta.trailers)
        elif ft is FrameType.ERROR:
            assert isinstance(meta, ErrorMeta)
            self._fail(RequestFailed(meta.code, meta.message, meta.retry_after_ms, dict(meta.timing)))
            return
        if len(frame.payload):
            if not self.t_first:
                self.t_first = perf_counter()
            self._items.append(frame.payload)
        if frame.end:
            self._ended = True
        self._poke()

    def _fail(self, exc: BaseException) -> None:
        self._error, self._ended = exc, True
        self._poke()

    def _poke(self) -> None:
        if self._ended and (done := self.on_done) is not None:
            self.on_done = None
            done()
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def __aiter__(self) -> AsyncIterator[Buffer]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Buffer]:
        while True:
            while self._items:
                yield self._items.pop(0)
            if self._ended:
                if self._error is not None:
                    raise self._error
                return
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake

    @property
    def done(self) -> bool:
        """The answer has ended (END, ERROR, a reset, the link's loss, or cancelled)."""
        return self._ended

    def send(self, chunk: Buffer) -> None:
        """More of a request opened with `end=False` (`Client.request`): one DATA frame, sent now.
        Ignored once the answer has ended. Raises ConnectionLost when the link is gone."""
        if not self._ended:
            self._client._send(self.sid, chunk, False)

    def end_input(self) -> None:
        """The request opened with `end=False` is complete (END, or DATA with FLAG_END)."""
        if not self._ended:
            self._client._send(self.sid, b"", True)

    async def drain(self) -> None:
        """Wait while the link's write buffer is full (backpressure for `send`)."""
        await self._client._link.drain()

    async def read(self) -> bytes:
        return b"".join([bytes(c) for c in [c async for c in self]])

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._ended:
            self._client._cancel(self.sid)


class Client:
    def __init__(self, link: LinkBase) -> None:
        self._link = link
        self._streams: dict[int, Stream] = {}

    @classmethod
    async def connect(
        cls,
        address: str = "127.0.0.1:7700",
        api_key: str = "",
        *,
        timeout: float = 5.0,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> Client:
        """Dial the ingress and authenticate (over TLS with `ssl`, e.g.
        `ssl.create_default_context(cafile=".casola/certs/ca.pem")`). `limits` are this client's
        receive limits, advertised in HELLO (the ingress sizes its frames to them).

        Raises:
            casola.net.handshake.Refused: the key was refused (UNAUTHENTICATED / FORBIDDEN_ROLE).
            ConnectionLost, OSError, TimeoutError: could not connect.
        """
        host, _, port = address.rpartition(":")
        hello = HelloMeta("client", credential=api_key, max_meta=limits.max_meta, max_payload=limits.max_payload)

        def dial(on_events: EventHandler, on_lost: LostHandler) -> Awaitable[LinkBase]:
            return dial_tcp(
                host, int(port), hello, on_events, on_lost,
                limits=limits, timeout=timeout, ssl=ssl, server_hostname=server_hostname,
            )  # fmt: skip

        return await cls.over(dial)

    @classmethod
    async def over(cls, dial: Callable[[EventHandler, LostHandler], Awaitable[LinkBase]]) -> Client:
        """A client on the link `dial(on_events, on_lost)` makes (any dialer: TCP, or in memory as the
        workflow engine's to its own queue node)."""
        box: list[Client] = []
        link = await dial(lambda lk, evs: box[0]._on_events(evs), lambda lk, exc: box[0]._on_lost(exc) if box else None)
        box.append(cls(link))
        return box[0]

    def stream(
        self,
        model: str,
        payload: Buffer = b"",
        *,
        params: Mapping[str, Param] | None = None,
        content_type: str = "",
        deadline_ms: int = 0,
        priority: int = 0,
        trace: bool = True,
        request_id: str = "",
        traceparent: str = "",
        tracestate: str = "",
    ) -> Stream:
        """Send a request; its answer arrives through the returned `Stream`. `priority` (higher
        first) may go up to what the API key allows (`casola keys create --max-priority`).
        `trace`: return the stages' timings (`Stream.timing`); `request_id` (else the ingress makes
        one), `traceparent`, `tracestate` (W3C Trace Context) reach the handler as given.

        Raises:
            ConnectionLost: the connection is gone. RequestFailed: no stream credit (OVERLOADED).
        """
        meta = RequestMeta(
            model,
            deadline_ms,
            content_type,
            dict(params or {}),
            trace,
            priority=priority,
            request_id=request_id,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        return self._open(meta, payload)

    def request(self, meta: RequestMeta, payload: Buffer = b"", *, end: bool = True) -> Stream:
        """Send a request whose head the caller built in full (a platform component speaking for a
        client: its tenant, filter policy, deadline). With `end=False` the request stays open: its
        body goes on in `Stream.send()` pieces until `Stream.end_input()` (a stream read as it comes,
        as a realtime session's audio). Raises like `stream`."""
        return self._open(meta, payload, end)

    def cancel(self, stream: Stream) -> None:
        """Stop a request whose answer is no longer wanted (the stream's worker sees CANCEL)."""
        if not stream._ended:
            self._cancel(stream.sid)
            stream._fail(RequestFailed(ErrorCode.CANCELLED, "cancelled by the client"))

    def _open(self, meta: RequestMeta, payload: Buffer, end: bool = True) -> Stream:
        link = self._link
        if not link.is_up:
            raise ConnectionLost("the connection to the ingress is closed")
        if link.conn.send_credit <= 0:
            raise RequestFailed(ErrorCode.OVERLOADED, "too many requests open on this connection")
        sid = link.conn.next_stream_id()
        view = memoryview(payload)
        first, rest = view[:CHUNK], view[CHUNK:]
        stream = self._streams[sid] = Stream(self, sid)
        last = FLAG_END if end else 0
        link.conn.send(Frame(FrameType.REQUEST, sid, meta, first, 0 if len(rest) else last))
        while len(rest):
            piece, rest = rest[:CHUNK], rest[CHUNK:]
            link.conn.send(Frame(FrameType.DATA, sid, None, piece, 0 if len(rest) else last))
        link.flush()
        return stream

    def _send(self, sid: int, chunk: Buffer, end: bool) -> None:
        link = self._link
        if not link.is_up:
            raise ConnectionLost("the connection to the ingress is closed")
        if not link.conn.is_open(sid):
            return
        if end and not len(chunk):
            link.send(Frame(FrameType.END, sid, EndMeta()))
        else:
            link.send(Frame(FrameType.DATA, sid, None, chunk, FLAG_END if end else 0))

    # -- async jobs (SPEC §3.8.1) ---------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        payload: Buffer = b"",
        *,
        params: Mapping[str, Param] | None = None,
        content_type: str = "",
        idempotency_key: str = "",
        webhook_url: str = "",
        priority: int = 0,
    ) -> JobView:
        """Persist an async job; returns once it is durable. Raises RequestFailed, ConnectionLost."""
        meta = RequestMeta(
            model,
            content_type=content_type,
            params=dict(params or {}),
            priority=priority,
            op="submit",
            idempotency_key=idempotency_key,
            webhook_url=webhook_url,
        )
        return decode_view(await self._open(meta, payload).read())

    async def job(self, job_id: str, *, wait_ms: int = 0) -> JobView:
        """The job's state; with `wait_ms`, once it completes or after that long."""
        params: dict[str, Param] = {"wait_ms": wait_ms} if wait_ms else {}
        return decode_view(await self._open(RequestMeta("", params=params, job_id=job_id, op="status"), b"").read())

    async def job_result(self, job_id: str, *, wait_ms: int = 0) -> Result | JobView:
        """The job's result bytes when it completed with one; else its state (pending or failed)."""
        params: dict[str, Param] = {"wait_ms": wait_ms} if wait_ms else {}
        s = self._open(RequestMeta("", params=params, job_id=job_id, op="result"), b"")
        body = await s.read()
        head = s.head or ResponseMeta()
        if head.headers.get("job-view") == "1":
            return decode_view(body)
        return Result(body, head.content_type, dict(head.headers), s.timing)

    async def cancel_job(self, job_id: str) -> JobView:
        """Cancel the job (queued or running); its state afterwards."""
        return decode_view(await self._open(RequestMeta("", job_id=job_id, op="cancel"), b"").read())

    async def run(self, model: str, payload: Buffer = b"", **kw: object) -> Result:
        """Send a request and wait for the whole answer. Raises RequestFailed, ConnectionLost."""
        s = self.stream(model, payload, **kw)  # type: ignore[arg-type]
        body = await s.read()
        head = s.head or ResponseMeta()
        return Result(body, head.content_type, dict(head.headers), s.timing)

    async def close(self) -> None:
        self._link.close()
        await self._link.closed

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _cancel(self, sid: int) -> None:
        self._streams.pop(sid, None)
        self._link.reset_if_open(sid, ErrorCode.CANCELLED, "cancelled by the client")

    def _on_events(self, events: list[Event]) -> None:
        streams = self._streams
        for ev in events:
            if type(ev) is Frame:
                s = streams.get(ev.stream_id)
                if s is not None:
                    if ev.end or ev.type is FrameType.ERROR:
                        del streams[ev.stream_id]
                    s._push(ev)
            elif type(ev) is StreamReset:
                s = streams.pop(ev.stream_id, None)
                if s is not None:
                    s._fail(RequestFailed(ev.code, ev.message))
            elif type(ev) is ConnectionTerminated:
                self._on_lost(None)

    def _on_lost(self, exc: BaseException | None) -> None:
        streams, self._streams = self._streams, {}
        for s in streams.values():
            s._fail(ConnectionLost(f"connection to the ingress lost: {exc or 'closed'}"))
