"""The built-in `echo` model: returns its input. Used by tests and bench/.

Parameters (HTTP headers `X-Casola-Param-<name>` or REQUEST params):
- `delay-ms`: simulated work before answering (the loop keeps running: it is an async sleep);
- `chunks`: answer in this many DATA frames instead of one frame;
- `chunk-delay-ms`: pause between chunks (to show streaming);
- `head-first`: send the response head before the delay (the queue node then never retries);
- `fail`: answer with a BAD_REQUEST error carrying this message;
- `blocking-ms`: simulated blocking work, run in the thread pool (a CPU/GPU-bound handler);
- `repeat`: answer the input this many times over, one DATA frame each (a large answer from a small
  request, as a generating model gives; tests of slow readers use it).
`started`, `finished` and `cancelled` count calls, so tests can see a CANCEL reach the handler.
"""

from __future__ import annotations

import asyncio
import time

from casola.wire import Buffer
from casola.worker.call import HandlerError, WorkCall
from casola.worker.model import param_bool, param_float, param_int

__all__ = ["Echo"]

MAX_CHUNKS = 4096
MAX_REPEAT = 65536


class Echo:
    name = "echo"

    def __init__(self) -> None:
        self.started = self.finished = self.cancelled = 0

    async def __call__(self, call: WorkCall) -> None:
        self.started += 1
        try:
            await self._run(call)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1

    async def _run(self, call: WorkCall) -> None:
        p = call.params
        if not p:  # the common case: nothing to parse
            call.respond(await call.body(), call.meta.content_type or "application/octet-stream")
            return
        if (msg := p.get("fail")) not in (None, ""):
            raise HandlerError(str(msg), param="fail")
        delay = param_float(p, "delay-ms") / 1000
        chunks = param_int(p, "chunks", 1)
        if not 1 <= chunks <= MAX_CHUNKS:
            raise HandlerError(f"chunks must be 1..{MAX_CHUNKS}", param="chunks")
        content_type = call.meta.content_type or "application/octet-stream"
        head_first = param_bool(p, "head-first")
        body = await call.body()
        if head_first:
            call.start(content_type)
        if (blocking := param_float(p, "blocking-ms") / 1000) > 0:
            await asyncio.get_running_loop().run_in_executor(None, time.sleep, blocking)
        if delay > 0:
            await asyncio.sleep(delay)
        if (repeat := param_int(p, "repeat", 1)) != 1:
            return await self._repeat(call, body, content_type, repeat)
        if chunks == 1 and not head_first:
            call.respond(body, content_type)
            return
        call.start(content_type)
        view, n = memoryview(body), len(body)
        step = -(-n // chunks) if n else 0
        pause = param_float(p, "chunk-delay-ms") / 1000
        for i in range(chunks):
            if i and pause > 0:
                await asyncio.sleep(pause)
            piece = view[i * step : (i + 1) * step] if step else b""
            if len(piece) or n == 0:
                await call.write(piece)
        call.end()

    @staticmethod
    async def _repeat(call: WorkCall, body: Buffer, content_type: str, n: int) -> None:
        if not 1 <= n <= MAX_REPEAT:
            raise HandlerError(f"repeat must be 1..{MAX_REPEAT}", param="repeat")
        call.start(content_type)
        for _ in range(n):
            await call.write(body)  # waits while the link is backed up: the answer is produced as taken
        call.end()
