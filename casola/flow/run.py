"""One run of a workflow: its deadline, its clock, its step requests, and what an async run keeps.

Every step request carries the caller's tenant, priority, filter policy, request id and trace
context (the node schedules and filters it as the caller's), `trace` (the step's stages are read
back), and the workflow's remaining budget as its deadline. A step that fails, or that the budget
does not reach, ends the run with an error naming the step (`StepFailed`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from time import perf_counter
from typing import Any

from casola.client import RequestFailed, Stream
from casola.flow.clock import StageClock
from casola.flow.frontdoor import FrontDoor
from casola.net.errors import ConnectionLost
from casola.wire import Buffer, ErrorCode, RequestMeta
from casola.wire.meta import FilterPolicy, Param

__all__ = ["Run", "StepFailed", "step_params"]

# The run's own deadline falls this much before the queue node's for the workflow call, and a step's
# this much after the run's: the run's timer fires first, and names the steps that were running.
_MARGIN_S = 0.002
_STEP_SLACK_MS = 2


class StepFailed(Exception):
    """The run cannot go on: `message` names the workflow and the step; `code` is the wire code."""

    def __init__(self, code: int, message: str, retry_after_ms: int = 0, param: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_ms, self.param = code, message, retry_after_ms, param


def step_params(params: Mapping[str, Param]) -> dict[str, dict[str, Param]]:
    """The workflow request's params addressed to one step: `<step>.<name>` (X-Casola-Param-asr.language)."""
    out: dict[str, dict[str, Param]] = {}
    for key, value in params.items():
        step, dot, name = key.partition(".")
        if dot and name:
            out.setdefault(step, {})[name] = value
    return out


def typed(value: Param) -> Any:
    """A parameter from an HTTP header is a string: "64" means 64 in a JSON body."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


class Run:
    def __init__(self, workflow: str, meta: RequestMeta, default_deadline_ms: int, stages: list[str], door: FrontDoor):
        self.workflow, self.meta, self.door = workflow, meta, door
        self.t0 = perf_counter()
        budget_ms = meta.deadline_ms or default_deadline_ms
        self.budget_ms = budget_ms
        self.deadline = self.t0 + max(budget_ms / 1000 - _MARGIN_S, 0.0005) if budget_ms else 0.0
        self.clock = StageClock(stages, self.t0)
        self.params = step_params(meta.params)
        self.stage_of = {name: i for i, name in enumerate(stages)}
        self._open: set[Stream] = set()
        # [stage, sent, last frame] per step request, seconds from t0: the run's waterfall
        self.timeline: list[list[Any]] = []
        self.late: list[str] | None = None  # the stages in flight when the deadline passed
        # every step request: its stage, its stream, when it was sent (a realtime turn's timing)
        self.sent: list[tuple[str, Stream, float]] = []

    def fail(self, code: int, what: str, message: str, retry_after_ms: int = 0) -> StepFailed:
        return StepFailed(code, f"workflow {self.workflow!r}: {what}: {message}", retry_after_ms)

    def remaining_ms(self, what: str) -> int:
        """The budget left for a step about to start (0: no deadline).

        Raises:
            StepFailed: DEADLINE_EXCEEDED, nothing is left.
        """
        if not self.deadline:
            return 0
        left = int((self.deadline - perf_counter()) * 1000)
        if left < 1:
            why = f"the workflow's deadline of {self.budget_ms} ms passed before it could start"
            raise self.fail(ErrorCode.DEADLINE_EXCEEDED, what, why)
        return left + _STEP_SLACK_MS

    def expired(self) -> StepFailed:
        """The error for a run whose deadline passed while steps were in flight."""
        late = self.late if self.late is not None else self.clock.in_flight()
        running = ", ".join(repr(s) for s in late) or "none (between steps)"
        return StepFailed(
            ErrorCode.DEADLINE_EXCEEDED,
            f"workflow {self.workflow!r}: deadline of {self.budget_ms} ms exceeded; still running: step {running}",
        )

    def open(
        self,
        stage: str,
        what: str,
        model: str,
        body: Buffer,
        content_type: str,
        params: Mapping[str, Param],
        *,
        deadline_ms: int = 0,
        filter: FilterPolicy = "",
    ) -> Stream:
        """Send one step request on the front door; its time counts for `stage` until its last
        frame. The run cancels it when it ends unanswered (`cancel_all`).

        Raises:
            StepFailed: the budget is spent, or the request could not be sent.
        """
        left = self.remaining_ms(what)
        if deadline_ms:
            left = min(left, deadline_ms) if left else deadline_ms
        m = self.meta
        meta = RequestMeta(
            model,
            left,
            content_type,
            dict(params),
            True,
            m.tenant,
            m.priority,
            filter=filter or m.filter,
            request_id=m.request_id,
            traceparent=m.traceparent,
            tracestate=m.tracestate,
        )
        try:
            stream = self.door.open(meta, body)
        except (RequestFailed, ConnectionLost) as exc:
            raise self.failed(what, exc) from None
        index, clock, streams = self.stage_of[stage], self.clock, self._open
        sent = perf_counter()
        self.sent.append((stage, stream, sent))
        entry = [stage, sent - self.t0, 0.0]
        self.timeline.append(entry)

        def done() -> None:
            now = perf_counter()
            clock.end(index, now)
            entry[2] = now - self.t0
            streams.discard(stream)

        clock.begin(index, sent)
        streams.add(stream)
        stream.on_done = done
        return stream

    @contextlib.asynccontextmanager
    async def request(self, stage: str, what: str, *args: Any, **kw: Any) -> AsyncIterator[Stream]:
        """`open` for a block: leaving it before the answer ended cancels the request (its worker
        sees CANCEL); a failed answer becomes StepFailed naming `what`."""
        stream = self.open(stage, what, *args, **kw)
        try:
            yield stream
        except (RequestFailed, ConnectionLost) as exc:
            raise self.failed(what, exc) from None
        finally:
            self.door.cancel(stream)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Work of `stage` done outside the front door (an HTTP tool's call) counted for it."""
        index = self.stage_of[stage]
        entry = [stage, perf_counter() - self.t0, 0.0]
        self.timeline.append(entry)
        self.clock.begin(index, perf_counter())
        try:
            yield
        finally:
            now = perf_counter()
            self.clock.end(index, now)
            entry[2] = now - self.t0

    def waterfall(self) -> str:
        """The timeline as the `x-casola-flow-timeline` trailer: JSON [[stage, sent_ms, done_ms], ...]."""
        rows = [[s, round(a * 1000, 3), round(b * 1000, 3)] for s, a, b in self.timeline]
        return json.dumps(rows, separators=(",", ":"))

    def cancel_all(self) -> None:
        """Every step request still unanswered is cancelled (the run ended: done, failed, or cancelled)."""
        for stream in list(self._open):
            self.door.cancel(stream)

    def failed(self, what: str, exc: Exception) -> StepFailed:
        if isinstance(exc, RequestFailed):
            return self.fail(exc.code, what, exc.message, exc.retry_after_ms)
        return self.fail(ErrorCode.SHUTTING_DOWN, what, f"the queue node link is gone ({exc})")
