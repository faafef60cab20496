"""A sync call's life in the queue node, from its admission to its end (DESIGN "Capacity pools and
scheduling", "Two contracts: sync and async"): started on a worker with a free slot, or queued in its
model's tenant-fair line unless `casola.queue.admission` refuses it at once; its one timer (deadline,
wait bound); retried once on another worker before the first response frame; expired, cancelled,
aborted by the content filter, failed, done.

It is given the node's configuration, the registry's models (a worker with free slots serves their
lines) and the node's counters; it finds the links to send on in the calls and workers themselves.
Handshakes, frame routing, jobs and the filter are not its business: they call it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from time import perf_counter

import msgspec

from casola.queue.admission import full, refusal, retry_after
from casola.queue.config import QueueConfig
from casola.queue.records import Call, ModelEntry, WorkerEntry
from casola.wire import ErrorCode, ErrorMeta, Frame, FrameType, error_info

__all__ = ["Dispatch"]

log = logging.getLogger("casola.queue")

REQUEST, ERROR = FrameType.REQUEST, FrameType.ERROR


class Dispatch:
    """The sync calls of one queue node (`QueueNode.dispatch`)."""

    def __init__(self, config: QueueConfig, models: Mapping[str, ModelEntry], stats: dict[str, int]) -> None:
        """`models`: the registry's (live); `stats`: the node's counters, which this adds to."""
        self.config, self.models, self.stats = config, models, stats
        self.loop: asyncio.AbstractEventLoop | None = None  # the node's, once it runs (for the calls' timers)

    # -- to a worker, or in line -------------------------------------------------------------------

    def schedule(self, call: Call, now: float) -> None:
        """An admitted call (its filter's verdict in, if it was held): start it, or queue it."""
        worker = call.model.pick()
        if worker is not None:
            self._start(call, worker)
        else:
            self._enqueue(call, now)

    def _enqueue(self, call: Call, now: float) -> None:
        """Wait for a slot, unless casola.queue.admission says it may not: then refuse at once, with
        Retry-After from the measured drain rate. A full line makes room by the longest line first."""
        model, line = call.model, call.model.pending
        if not model.live_workers:  # every worker draining or unhealthy: nothing to wait for
            msg = f"no worker for model {model.name!r} can serve ({len(model.workers)} connected)"
            return self.fail(call, ErrorCode.NO_CAPACITY, msg, self.config.retry_after_ms)
        refused = refusal(call, model, self.config, now)
        if refused is None and len(line) >= self.config.max_pending:
            victim = line.evict_for(call.meta.tenant)
            if victim is None:
                refused = full(model, call.meta.tenant, self.config)
            else:
                why = f"model {model.name!r}: its line is full; tenant {victim.meta.tenant!r} has the longest part"
                self.fail(victim, ErrorCode.OVERLOADED, why, retry_after(model, victim.meta.tenant, self.config))
        if refused is not None:
            self.stats["deadline_refused"] += refused.late
            self.fail(call, refused.code, refused.message, refused.retry_after_ms)
            return
        call.t_queued = now
        line.push(call)
        self._arm(call, now)

    def _arm(self, call: Call, now: float) -> None:
        """The call's one timer: while it waits, for the earlier of its deadline and wait bound;
        once it runs, for its deadline."""
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        at = call.deadline if call.worker is not None else call.start_limit
        if at:
            call.timer = self.loop.call_later(at - now, self._expire, call)  # type: ignore[union-attr]

    def _start(self, call: Call, worker: WorkerEntry) -> None:
        """Open the stream on the worker and forward every request frame seen so far."""
        now = perf_counter()
        if call.t_queued:
            call.wait += now - call.t_queued
            call.t_queued = 0.0
        if not call.attempt:
            call.model.signals.started("sync", call.wait)
        meta = call.meta
        if call.deadline:
            remaining = int((call.deadline - now) * 1000)
            if remaining <= 0:
                return self.fail(call, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before a slot was free")
            meta = msgspec.structs.replace(meta, deadline_ms=remaining, attempt=call.attempt)
        elif call.attempt:
            meta = msgspec.structs.replace(meta, attempt=call.attempt)
        link = worker.link
        sid = link.conn.next_stream_id()
        frames = call.frames
        first = frames[0]
        link.conn.send(Frame(REQUEST, sid, meta, first.payload, first.flags))
        for f in frames[1:]:
            link.conn.send(Frame(f.type, sid, f.meta, f.payload, f.flags))
        call.worker, call.w_sid = worker, sid
        worker.calls[sid] = call
        if call.timer is not None or call.deadline:
            self._arm(call, now)  # from now on only the deadline counts, not the wait bound
        # Dispatched = handed to the transport: the write syscall (which wakes the worker's side)
        # is transmission, so it counts in worker-rtt, not in the node's own overhead.
        call.t_dispatch = perf_counter()
        link.flush()

    def serve_pending(self, worker: WorkerEntry) -> None:
        """A worker has free slots: give them to waiting requests, one per model in turn (a model
        that is flooded takes its turn, not every slot of a worker it shares with others), each
        model's line in its own (tenant round-robin) order."""
        models = self.models
        lines = None  # built only when something waits (the common case allocates nothing)
        for name in worker.models:
            if models[name].pending:
                lines = lines or []
                lines.append(models[name].pending)
        turn = 0
        while lines and worker.free > 0:
            line = lines[turn % len(lines)]
            self._start(line.pop(), worker)
            if line:
                turn += 1
            else:
                lines.remove(line)

    def may_retry(self, call: Call, failed: WorkerEntry) -> bool:
        """Whether another worker could run `call` (now or once a slot frees); else the failed
        worker's own error is the answer (its code, message and Retry-After), not a retry's."""
        return any(w is not failed and w.serving for w in call.model.workers)

    def retry(self, call: Call, failed: WorkerEntry, why: str, code: int) -> None:
        """Run `call` again elsewhere after its worker failed it with `code` before answering."""
        self.stats["retries"] += 1
        log.info("retrying %s on another worker: %s", call.meta.model, why, extra={"request_id": call.meta.request_id})
        call.attempt += 1
        call.worker = None
        other = call.model.pick(exclude=failed)
        if other is not None:
            self._start(call, other)
        elif any(w is not failed and w.serving for w in call.model.workers):
            call.t_queued = perf_counter()
            call.model.pending.push(call, front=True)  # it has waited already: first in line
            self._arm(call, call.t_queued)
        elif code == ErrorCode.SHUTTING_DOWN:  # not processed: the client may retry it as it is
            self.fail(call, code, f"{why}; no other worker to run it", self.config.retry_after_ms)
        else:
            self.fail(call, ErrorCode.WORKER_FAILED, f"{why}; no other worker to retry on")

    def _expire(self, call: Call) -> None:
        call.timer = None
        deadline_ms = (call.deadline - call.t_recv) * 1000
        if call.worker is not None:
            self._release_worker_stream(call, ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded")
            return self.fail(call, ErrorCode.DEADLINE_EXCEEDED, f"deadline of {deadline_ms:.0f} ms exceeded")
        model, tenant = call.model, call.meta.tenant
        model.pending.remove(call)
        if call.deadline and call.deadline <= call.start_limit:
            return self.fail(call, ErrorCode.DEADLINE_EXCEEDED, f"deadline of {deadline_ms:.0f} ms exceeded")
        msg = (
            f"model {model.name!r}: waited {self.config.sync_wait_ms} ms for a slot without one (tenant"
            f" {tenant!r} has {model.pending.depth(tenant)} more waiting)"
        )
        self.fail(call, ErrorCode.OVERLOADED, msg, retry_after(model, tenant, self.config))

    def worker_failed(self, call: Call, worker: WorkerEntry, code: int, message: str) -> None:
        """`call`'s stream on `worker` is gone (reset, or the worker lost): retry it, or fail it."""
        self.stats["worker_failures"] += 1
        if call.retryable and (code == ErrorCode.SHUTTING_DOWN or error_info(code).retryable):
            self.retry(call, worker, f"worker {worker.node_id}: {message}", code)
        else:
            self.fail(call, ErrorCode.WORKER_FAILED, f"worker failed mid-request: {message}")

    # -- endings -----------------------------------------------------------------------------------

    def cancel(self, call: Call, message: str) -> None:
        """The client no longer wants the answer: free its slot or its place in line."""
        call.finished = True
        if call.timer is not None:
            call.timer.cancel()
        if call.worker is None:
            call.model.pending.remove(call)
        else:
            self._release_worker_stream(call, ErrorCode.CANCELLED, message)

    def _release_worker_stream(self, call: Call, code: int, message: str) -> None:
        worker = call.worker
        if worker is not None and worker.calls.pop(call.w_sid, None) is not None:
            worker.link.reset_if_open(call.w_sid, code, message)

    def fail(self, call: Call, code: int, message: str, retry_after_ms: int = 0) -> None:
        self.stats["refused"] += 1
        timing = call.refusal_timing(perf_counter())
        call.ing.send_if_open(Frame(ERROR, call.ing_sid, ErrorMeta(code, message, retry_after_ms, timing=timing)))
        self.done(call)

    def fail_pending(self, model: ModelEntry, code: int, message: str) -> None:
        for call in model.pending.drain():
            self.fail(call, code, message, self.config.retry_after_ms)

    def done(self, call: Call) -> None:
        call.finished = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        call.ing.tag.pop(call.ing_sid, None)
        worker = call.worker
        if worker is not None:
            worker.calls.pop(call.w_sid, None)
            call.model.signals.finished(worker.pool, perf_counter() - call.t_dispatch)

    # -- what the content filter decides ---------------------------------------------------------------

    def abort_call(self, call: Call, code: int, message: str) -> None:
        """Stop a request that is still here: out of its line, or CANCEL to its worker; the client
        gets the error (a stream ends with it)."""
        if call.finished:
            return
        if call.filter is not None:
            call.filter.held = []  # a held answer is never sent
        if call.worker is None:
            call.model.pending.remove(call)
        else:
            self._release_worker_stream(call, code, message)
        self.fail(call, code, message)

    def release_answer(self, call: Call) -> None:
        """The verdict on a `hold` request is clean: what its worker answered so far goes on now
        (the wait counts as the filter's, not the node's), the rest as it comes."""
        check = call.filter
        assert check is not None
        frames, check.held = check.held, []
        now = perf_counter()
        if frames:
            call.held_s += now - frames[0][1]
        for frame, t_answer in frames:
            call.ing.send_if_open(call.answer(frame, t_answer, now))
            if frame.end or frame.type is ERROR:
                self.done(call)

    def release_held(self, call: Call) -> None:
        """The verdict on a held (block) request is clean: dispatch it now."""
        now = perf_counter()
        call.held = False
        call.held_s = now - call.t_recv
        self.schedule(call, now)
