"""The workflow engine (DESIGN "Workflows"): runs in the queue node's process as a client of the
node's own dispatch, and never reaches into it.

It meets the node only through its front door (`QueueNode.connect_member`), twice:
- as a worker serving one model per workflow name (casola.worker.WorkerRuntime on an in-memory
  link): a REQUEST for a workflow's name is scheduled, filtered, timed and refused like any other,
  and handed to the engine; an async one is a job like any other, leased, fenced, redispatched;
- as an ingress (casola.flow.frontdoor), on which every step is an ordinary request.

A run streams its steps into each other (casola.flow.stages), under one deadline; its answer is the
last step's output, streamed, with `step.<name>`, `flow-overhead` and `first-byte` in its timings
(casola.flow.clock). An async run checkpoints each completed step's output (the job's CHECKPOINT);
redispatched after a crash, it resumes after the last completed step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from time import perf_counter
from typing import Any

import msgspec

from casola.flow.frontdoor import Connect, FrontDoor
from casola.flow.pipeline import build_pipeline
from casola.flow.run import Run, StepFailed
from casola.flow.spec import WorkflowConfig, check_workflows
from casola.flow.stages import TEXT, Given, Item, Source
from casola.flow.tools import Tool
from casola.flow.wav import WavFormatError
from casola.net.outbound import OutboundPolicy
from casola.realtime.agent import Agent
from casola.realtime.framing import CONTENT_TYPE as REALTIME
from casola.realtime.session import VoiceSession
from casola.realtime.timing import TurnStats
from casola.wire import ErrorCode
from casola.worker.call import HandlerError, WorkCall
from casola.worker.runtime import WorkerConfig, WorkerRuntime

__all__ = ["Engine", "Workflow"]

log = logging.getLogger("casola.flow")

SESSION_SHARE_RETRY_MS = 2000  # a tenant at its share of a workflow's sessions: when to try again
TIMELINE = "x-casola-flow-timeline"  # END trailer of a traced run: when each step request was sent and answered


class _Checkpoint(msgspec.Struct, array_like=True):
    step: int  # the last completed step (index)
    content_type: str
    items: list[Any]  # bytes (msgpack bin) or str, as the step gave them


_encode_checkpoint = msgspec.msgpack.Encoder().encode
_decode_checkpoint = msgspec.msgpack.Decoder(_Checkpoint).decode


def stage_names(config: WorkflowConfig) -> list[str]:
    """The timing stages, in pipeline order: each step that sends requests, an llm step's tools right
    after it. A `sentences` step sends none: its own time is the platform's (`flow-overhead`)."""
    out: list[str] = []
    for step in config.steps:
        out += [] if step.kind == "sentences" else [step.name]
        out += [f"{step.name}.{t}" for t in step.tools] if step.kind == "llm" else []
    return out


class Workflow:
    """One declared workflow, as the model the engine's worker serves under its name."""

    def __init__(
        self, name: str, config: WorkflowConfig, door: FrontDoor, tools: dict[str, Tool], stats: TurnStats
    ) -> None:
        self.name, self.config, self._door, self.tools = name, config, door, tools
        self._stages = stage_names(config)
        self.agent = Agent(name, config, tools, door, self._stages, stats)
        self.sessions: set[VoiceSession] = set()

    async def __call__(self, call: WorkCall) -> None:
        """One run (its slots, waiting and refusals are the queue node's, as for any model: /healthz),
        or, for a REQUEST of the realtime content type, one voice session (casola.realtime)."""
        if call.meta.content_type == REALTIME:
            return await self._session(call)
        resumed = await call.resume()
        body = await call.body()
        run = Run(self.name, call.meta, self.config.deadline_ms, self._stages, self._door)
        src: Source = Given(call.meta.content_type, [body])
        start = 0
        if resumed and (cp := self._checkpoint(resumed, call.job_id)) is not None:
            src, start = Given(cp.content_type, cp.items), cp.step + 1
            steps = len(self.config.steps)
            log.info("workflow %s: job %s resumes at step %d of %d", self.name, call.job_id, start + 1, steps)
        src = self._pipeline(run, src, start, call if call.job_id else None)
        expiry = _arm(run)
        try:
            await _serve(call, run, src)
        except asyncio.CancelledError:
            if run.late is None:  # cancelled from outside (the caller went away): not ours to answer
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            exc = run.expired()
            raise HandlerError(exc.message, exc.code) from None
        except StepFailed as exc:
            raise HandlerError(exc.message, exc.code, exc.param, exc.retry_after_ms) from None
        except WavFormatError as exc:
            raise HandlerError(f"workflow {self.name!r}: {exc}", ErrorCode.WORKER_FAILED) from None
        finally:
            if expiry is not None:
                expiry.cancel()
            run.cancel_all()

    async def _session(self, call: WorkCall) -> None:
        if call.job_id:
            raise HandlerError("a realtime session is not an async job", ErrorCode.BAD_REQUEST)
        if self.agent.first_step < 0:
            msg = f"workflow {self.name!r} has no llm step: it cannot hold a conversation"
            raise HandlerError(msg, ErrorCode.BAD_REQUEST)
        self._check_tenant_share(call.meta.tenant)
        dialect = str(call.meta.params.get("dialect", "native"))
        session = VoiceSession(call, self.agent, dialect)
        self.sessions.add(session)
        try:
            await session.serve()
        finally:
            self.sessions.discard(session)

    def _check_tenant_share(self, tenant: str) -> None:
        """A session holds its slot for as long as it lasts: one tenant's may not take them all,
        whatever the ingress or frame connection they came through (OVERLOADED, retryable)."""
        share = self.config.realtime.tenant_share(self.config.max_concurrent)
        if sum(s.call.meta.tenant == tenant for s in self.sessions) >= share:
            msg = f"tenant {tenant!r} holds {share} sessions of workflow {self.name!r}, the most it may"
            raise HandlerError(msg, ErrorCode.OVERLOADED, retry_after_ms=SESSION_SHARE_RETRY_MS)

    def _checkpoint(self, state: bytes, job_id: str) -> _Checkpoint | None:
        """The checkpoint to resume from; None (run from the start) for one this declaration cannot
        have written (unreadable, or past its last step: the config changed)."""
        try:
            cp = _decode_checkpoint(state)
        except msgspec.DecodeError:
            cp = None
        if cp is None or not 0 <= cp.step < len(self.config.steps) - 1:
            log.warning("workflow %s: job %s has a checkpoint it cannot resume from; from the start", self.name, job_id)
            return None
        return cp

    def _pipeline(self, run: Run, src: Source, start: int, job: WorkCall | None) -> Source:
        saver = None if job is None else (lambda i: self._checkpointer(job, i))
        return build_pipeline(run, self.config, self.tools, src, start, checkpoint=saver)

    def _checkpointer(self, job: WorkCall, index: int) -> Any:
        n = len(self.config.steps)

        async def checkpoint(name: str, content_type: str, items: list[Item]) -> None:
            state = _encode_checkpoint(_Checkpoint(index, content_type, list(items)))
            await job.checkpoint(state, (index + 1) / n)

        return checkpoint


def _arm(run: Run) -> asyncio.TimerHandle | None:
    """The run's deadline: when it passes, the steps still running are noted (the error names them)
    and the run is cancelled, which cancels every step in flight."""
    if not run.deadline:
        return None
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None

    def expire() -> None:
        run.late = run.clock.in_flight()
        task.cancel()

    return loop.call_at(loop.time() + (run.deadline - perf_counter()), expire)


async def _serve(call: WorkCall, run: Run, src: Source) -> None:
    """Stream the last step's output as the run's answer; its stages go in the END's timings."""
    started = False
    async with contextlib.aclosing(src.items()) as items:  # type: ignore[type-var]
        async for item in items:
            data = item.encode() if isinstance(item, str) else item
            if not data:
                continue
            if not started:
                run.clock.first_byte = perf_counter() - run.t0
                call.start(src.content_type or TEXT)
                started = True
            await call.write(data)
    now = perf_counter()
    stages = run.clock.stages(now)
    stages["first-byte"] = run.clock.first_byte * 1000
    call.work_ms = (now - run.t0) * 1000  # what the stages add up to
    call.stages = stages
    if started:
        call.end({TIMELINE: run.waterfall()} if run.meta.trace else None)
    else:
        call.respond(b"", src.content_type or TEXT)


class Engine:
    """Every `[workflows.*]` of the config, served through the node's front door (`connect`)."""

    def __init__(
        self, workflows: dict[str, WorkflowConfig], connect: Connect, node_id: str, outbound_allow: Iterable[str] = ()
    ) -> None:
        """Raises WorkflowError for a declaration that cannot run (the config loader checks first)."""
        check_workflows(workflows)
        policy = OutboundPolicy(outbound_allow)
        self.door = FrontDoor(connect, f"{node_id}/workflows")
        self.turn_stats = TurnStats()  # every realtime turn's figures (/metrics)
        self.workflows = {
            name: Workflow(name, wf, self.door, {t: Tool(t, c, policy) for t, c in wf.tools.items()}, self.turn_stats)
            for name, wf in workflows.items()
        }
        # One worker per workflow, its slots the workflow's max_concurrent: the node schedules runs
        # like any model's requests (a line per tenant, served in turn), so one tenant's flood of a
        # workflow waits behind the others' runs instead of taking every slot.
        self.runtimes = [
            WorkerRuntime(
                WorkerConfig(models=[name], capacity=wf.config.max_concurrent, node_id=f"{node_id}/workflow/{name}"),
                [wf],
                "",
                dial=connect,
            )
            for name, wf in self.workflows.items()
        ]

    async def start(self) -> None:
        await self.door.start()
        for rt in self.runtimes:
            await rt.start()
            await rt.wait_registered()
        log.info("workflows served: %s", ", ".join(self.workflows))

    async def stop(self, drain_s: float = 10.0) -> None:
        """Take no new run (the node refuses them as from any draining worker: 503, retryable),
        let those running finish up to `drain_s`, then close; the steps' workers must still be up.
        Realtime sessions end (SHUTTING_DOWN: their clients reconnect) once their answer in progress is done."""
        for wf in self.workflows.values():
            for session in list(wf.sessions):
                session.drain()
        await asyncio.gather(*(rt.drain(timeout=drain_s) for rt in self.runtimes))
        await self.door.stop()
        for wf in self.workflows.values():
            for tool in wf.tools.values():
                await tool.aclose()
