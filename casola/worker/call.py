"""What a model handler sees of one request: its metadata, its input, and a way to answer.

The input arrives as the queue node forwarded it (REQUEST payload, then DATA frames); the answer
leaves as RESPONSE (+ DATA*) + END, or as one RESPONSE frame with FLAG_END when the handler answers
in one piece (`respond`). `work` (milliseconds) is reported in the last frame: the time the handler
ran, or what the handler set in `work_ms` (e.g. the GPU time alone).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping

from casola.net.link import LinkBase
from casola.wire import FLAG_END, Buffer, EndMeta, ErrorCode, ErrorMeta, Frame, FrameType, RequestMeta, ResponseMeta
from casola.wire.meta import Param

__all__ = ["HandlerError", "WorkCall"]


class HandlerError(Exception):
    """Raised by a handler to refuse a request with a wire error code (BAD_REQUEST by default)."""

    def __init__(self, message: str, code: int = ErrorCode.BAD_REQUEST, param: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


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
        self.started = False
        self.finished = False
        self.cancelled = False
        self._chunks: list[Buffer] = [frame.payload] if len(frame.payload) else []
        self._input_done = frame.end
        self._more: asyncio.Future[None] | None = None
        # Set by the runtime: queues the CREDIT that frees this call's slot. Called as the last frame
        # is queued, so the answer and the credit leave in one write.
        self.release: Callable[[], None] | None = None

    def _send_last(self, frame: Frame) -> None:
        self.finished = True
        conn = self.link.conn
        conn.send(frame)
        if self.release is not None:
            self.release()
            self.release = None
        self.link.flush_soon()  # answers finishing in one loop iteration leave in one write

    # -- input -----------------------------------------------------------------------------------

    def feed(self, payload: Buffer, end: bool) -> None:
        """The runtime hands over a DATA/END payload."""
        if len(payload):
            self._chunks.append(payload)
        self._input_done = self._input_done or end
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

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
        meta = ResponseMeta(content_type, headers or {}, {"work": self._work()})
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
        self.link.send(Frame(FrameType.DATA, self.sid, None, chunk))
        await self.link.drain()

    def end(self, trailers: dict[str, str] | None = None) -> None:
        if not self.started:
            self.start()
        self._check()
        self._send_last(Frame(FrameType.END, self.sid, EndMeta({"work": self._work()}, 0, trailers or {})))

    def fail(self, code: int, message: str, param: str = "") -> None:
        """End the stream with an error (used by the runtime when a handler raises)."""
        if self.finished or not self.link.conn.is_open(self.sid):
            return
        meta = ErrorMeta(code, message[:1000], 0, param, {"work": self._work()})
        self._send_last(Frame(FrameType.ERROR, self.sid, meta))

    def _work(self) -> float:
        if self.work_ms is not None:
            return self.work_ms
        return (time.perf_counter() - self.t_start) * 1000

    def _check(self) -> None:
        if self.finished or self.cancelled or not self.link.conn.is_open(self.sid):
            raise asyncio.CancelledError("the request was cancelled or already answered")
