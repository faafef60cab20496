"""What a model handler sees of one request: its metadata, its input, and a way to answer.

An async job's dispatch also carries the job id, the lease's fencing token and, when it is a
redispatch, the job's last checkpoint (`resume()`), which the handler continues from. The handler
records progress with `checkpoint()`; every CHECKPOINT and the final END carry the fence, so a
worker whose lease was taken over cannot overwrite the job (SPEC §3.14).

The input arrives as the queue node forwarded it (REQUEST payload, then DATA frames); the answer
leaves as RESPONSE (+ DATA*) + END, or as one RESPONSE frame with FLAG_END when the handler answers
in one piece (`respond`). `work` (milliseconds) is reported in the last frame when the request asked
for timings (`trace`): the time the handler ran since its input was complete (waiting for input bytes
is not work), or what the handler set in `work_ms` (e.g. the GPU time alone).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping

from casola.net.link import LinkBase
from casola.wire import (
    FLAG_END,
    Buffer,
    CheckpointMeta,
    EndMeta,
    ErrorCode,
    ErrorMeta,
    Frame,
    FrameType,
    RequestMeta,
    ResponseMeta,
)
from casola.wire.meta import Param

__all__ = ["AnswerClosed", "HandlerError", "WorkCall"]


class HandlerError(Exception):
    """Raised by a handler to refuse a request with a wire error code (BAD_REQUEST by default);
    `retry_after_ms`: when the client may try again (a refusal for load)."""

    def __init__(self, message: str, code: int = ErrorCode.BAD_REQUEST, param: str = "", retry_after_ms: int = 0):
        super().__init__(message)
        self.code, self.message, self.param, self.retry_after_ms = code, message, param, retry_after_ms


class AnswerClosed(RuntimeError):
    """A handler tried to answer a request whose answer is already complete (a handler bug, not a
    cancellation: the runtime logs it)."""


class WorkCall:
    """One request on a worker. Handlers call `body()`/`chunks()`, then `respond()` or
    `start()` + `write()`* + `end()`."""

    def __init__(self, link: LinkBase, sid: int, frame: Frame) -> None:
        meta = frame.meta
        assert isinstance(meta, RequestMeta)
        self.meta = meta
        self.params: Mapping[str, Param] = meta.params
        self.link = link
        self.sid = sid
        self.t_start = time.perf_counter()
        self.work_ms: float | None = None
        self.t_first = 0.0  # perf_counter() when the first answer bytes left (0: none yet)
        # More stages for the last frame's timing, after `work` (a workflow's `step.<name>`, ...).
        self.stages: dict[str, float] | None = None
        self.started = False
        self.finished = False
        self.cancelled = False
        self.job_id = meta.job_id  # "" for a sync request
        self.request_id = meta.request_id  # the client's X-Request-Id, or the one the ingress made
        # W3C Trace Context of the caller ("" when none), for a handler that continues the trace.
        self.traceparent = meta.traceparent
        self.tracestate = meta.tracestate
        self.fence = meta.fence
        self.attempt = meta.attempt
        self._seq = 0  # CHECKPOINTs sent on this stream
        self._resume_need = meta.resume_len  # checkpoint bytes still to split off the input's front
        self._resume: list[Buffer] = []
        self._chunks: list[Buffer] = []
        self._input_done = frame.end
        if len(frame.payload):
            self._take(frame.payload)
        self._more: asyncio.Future[None] | None = None
        # Set by the runtime: queues the CREDIT that frees this call's slot. Called as the last frame
        # is queued, so the answer and the credit leave in one write.
        self.release: Callable[[], None] | None = None

    def _send_last(self, frame: Frame) -> None:
        self.finished = True
        try:
            self.link.conn.send(frame)
        finally:
            self.done()
        self.link.flush_soon()  # answers finishing in one loop iteration leave in one write

    def done(self) -> None:
        """Give this call's slot back (once; later calls do nothing). The runtime calls it whatever
        became of the call; the last frame calls it as it is queued, so answer and credit leave together."""
        release = self.release
        if release is not None:
            self.release = None
            release()

    # -- input -----------------------------------------------------------------------------------

    def feed(self, payload: Buffer, end: bool) -> None:
        """The runtime hands over a DATA/END payload."""
        if len(payload):
            self._take(payload)
        if end and not self._input_done:
            self._input_done = True
            self.t_start = time.perf_counter()  # `work` starts when the handler has its input
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    def _take(self, payload: Buffer) -> None:
        need = self._resume_need
        if need:  # the checkpoint comes first (REQUEST `resume_len`); split it off without copying
            view = memoryview(payload)
            self._resume.append(view[:need])
            self._resume_need = need - len(view[:need])
            payload = view[need:]
            if not len(payload):
                return
        self._chunks.append(payload)

    async def resume(self) -> bytes | None:
        """The checkpoint this job resumes from (a redispatch after a lost lease), else None."""
        if not self.meta.resume_len:
            return None
        while self._resume_need and not self._input_done:
            await self._wait_input()
        if self._resume_need:
            raise HandlerError("the request ended inside its resume checkpoint")
        return b"".join(self._resume)

    async def body(self) -> Buffer:
        """The whole input (joined once if it came in several frames)."""
        while not self._input_done:
            await self._wait_input()
        chunks = self._chunks
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def chunks(self) -> AsyncIterator[Buffer]:
        """The input as it arrives, frame by frame."""
        while True:
            while self._chunks:
                yield self._chunks.pop(0)
            if self._input_done:
                return
            await self._wait_input()

    async def _wait_input(self) -> None:
        self._more = asyncio.get_running_loop().create_future()
        await self._more

    # -- output ----------------------------------------------------------------------------------

    def respond(self, payload: Buffer = b"", content_type: str = "", headers: dict[str, str] | None = None) -> None:
        """Answer in one frame (RESPONSE with FLAG_END) and finish."""
        self._check()
        self.started = True
        if len(payload):
            self.t_first = time.perf_counter()
        meta = ResponseMeta(content_type, headers or {}, self._timing())
        self._send_last(Frame(FrameType.RESPONSE, self.sid, meta, payload, FLAG_END))

    def start(self, content_type: str = "", headers: dict[str, str] | None = None) -> None:
        """Send the response head; the body follows with `write()` and `end()`."""
        self._check()
        if not self.started:
            self.started = True
            self.link.send(Frame(FrameType.RESPONSE, self.sid, ResponseMeta(content_type, headers or {})))

    async def write(self, chunk: Buffer) -> None:
        """Send one piece of the answer now; waits while the link's write buffer is full."""
        if not self.started:
            self.start()
        self._check()
        if not self.t_first and len(chunk):
            self.t_first = time.perf_counter()
        self.link.send(Frame(FrameType.DATA, self.sid, None, chunk))
        await self.link.drain()

    def send(self, chunk: Buffer) -> bool:
        """`write` without waiting for the link (a long-lived stream answering from callbacks, as a
        realtime session does; it awaits `link.drain()` where it can). False: the answer is closed
        (cancelled, or answered), and nothing was sent."""
        if self.finished or self.cancelled or not self.link.conn.is_open(self.sid):
            return False
        if not self.started:
            self.start()
        if not self.t_first and len(chunk):
            self.t_first = time.perf_counter()
        self.link.send(Frame(FrameType.DATA, self.sid, None, chunk))
        return True

    def end(self, trailers: dict[str, str] | None = None) -> None:
        if not self.started:
            self.start()
        self._check()
        meta = EndMeta(self._timing(streamed=True), self.fence, trailers or {})
        self._send_last(Frame(FrameType.END, self.sid, meta))

    async def checkpoint(self, state: Buffer, progress: float = 0.0) -> None:
        """Record progress of an async job: `state` is what a redispatch would `resume()` from.

        Renews the job's lease. A no-op for sync requests (they are never redispatched)."""
        self._check()
        if not self.job_id:
            return
        self._seq += 1
        meta = CheckpointMeta(self._seq, self.fence, min(max(progress, 0.0), 1.0))
        self.link.send(Frame(FrameType.CHECKPOINT, self.sid, meta, state))
        await self.link.drain()

    def fail(self, code: int, message: str, param: str = "", retry_after_ms: int = 0) -> None:
        """End the stream with an error (used by the runtime when a handler raises)."""
        if self.finished or not self.link.conn.is_open(self.sid):
            return
        meta = ErrorMeta(code, message[:1000], retry_after_ms, param, self._timing())
        self._send_last(Frame(FrameType.ERROR, self.sid, meta))

    def _timing(self, streamed: bool = False) -> dict[str, float]:
        """The worker's stage for the last frame: `work`, when the request asked for timings."""
        if not self.meta.trace:
            return {}
        # A streamed answer's `first-byte` is a mark, not a stage (within `work`): the handler's time
        # to its first answer bytes, which a caller reading the stream as it comes (a realtime turn) needs.
        out = {"work": self._work()}
        if streamed and self.t_first:
            out["first-byte"] = max(self.t_first - self.t_start, 0.0) * 1000
        return out if self.stages is None else {**out, **self.stages}

    def _work(self) -> float:
        if self.work_ms is not None:
            return self.work_ms
        return (time.perf_counter() - self.t_start) * 1000

    def _check(self) -> None:
        if self.finished:
            raise AnswerClosed(f"stream {self.sid} is already answered")
        if self.cancelled or not self.link.conn.is_open(self.sid):
            raise asyncio.CancelledError("the request was cancelled")  # CANCEL, a reset, or the link's loss
