"""The built-in `steps` model: a long job that checkpoints after every step and resumes from its
last checkpoint when redispatched. Used by tests, bench/ and as the example of a resumable handler.

Parameters: `steps` (default 5), `step-ms` (time per step, default 100), `blocking` (1: sleep in
the thread pool, a CPU/GPU-bound step). The checkpoint is the number of steps done, in ASCII.
The answer (JSON) says where it resumed, so a caller can see that nothing was redone:
`{"steps": n, "resumed_at": k, "ran": [k+1, ..., n], "attempt": a, "input_bytes": b}`.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from casola.worker.call import HandlerError, WorkCall
from casola.worker.model import param_bool, param_float, param_int

__all__ = ["Steps"]

MAX_STEPS = 100_000


class Steps:
    name = "steps"

    def __init__(self) -> None:
        self.steps_run = 0  # across calls, for in-process tests

    async def __call__(self, call: WorkCall) -> None:
        p = call.params
        n = param_int(p, "steps", 5)
        if not 1 <= n <= MAX_STEPS:
            raise HandlerError(f"steps must be 1..{MAX_STEPS}", param="steps")
        pause = param_float(p, "step-ms", 100.0) / 1000
        blocking = param_bool(p, "blocking")
        state = await call.resume()
        try:
            done = int(state) if state is not None else 0
        except ValueError:
            raise HandlerError("the resume checkpoint is not a step count") from None
        body = await call.body()
        ran = []
        loop = asyncio.get_running_loop()
        for step in range(done + 1, n + 1):
            if blocking:
                await loop.run_in_executor(None, time.sleep, pause)
            else:
                await asyncio.sleep(pause)
            self.steps_run += 1
            ran.append(step)
            await call.checkpoint(str(step).encode(), step / n)
        answer = {"steps": n, "resumed_at": done, "ran": ran, "attempt": call.attempt, "input_bytes": len(body)}
        call.respond(msgspec.json.encode(answer), "application/json")
