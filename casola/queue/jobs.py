"""The async job life cycle on a queue node (DESIGN "Two contracts: sync and async").

A job is persisted before anything else happens (`casola.queue.jobops` answers the submit only
after the store's durable commit). This module moves it on from there:

- claim: when a worker of the async or shared pool (`casola.queue.scheduler`) serving the model has
  a free slot and no sync request waits for it (sync first), the job is leased to that worker with
  a new fencing token and dispatched as an ordinary REQUEST carrying `job_id`, `fence`, `attempt`
  and, after a lost lease, the last checkpoint (`resume_len`). When a slot is free at submit time
  the submit itself leases the job (one commit);
- progress: the worker's HEARTBEATs renew the leases of every job it runs; its CHECKPOINTs are
  stored (and renew too). A stale fence is refused and the worker's stream is cancelled;
- outcome: the answer (RESPONSE + DATA* + END) is collected and recorded once; a retryable worker
  error, a dropped connection, a reset stream or an expired lease (the worker hung) puts the job
  back in the queue with its checkpoint, until `max_attempts`, then it completes with an error;
- afterwards: waiters (long polls) are woken, the webhook is queued, and the periodic sweep takes
  back expired leases (also those of queue nodes that died, on a shared store), delivers due
  webhooks and purges jobs past their retention.

The store is the truth; what this node keeps in memory (`running`) is only what it dispatched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from time import perf_counter

from casola.net.outbound import OutboundPolicy
from casola.queue.config import JobsConfig, QueueConfig
from casola.queue.records import ModelEntry, RunningJob, WorkerEntry
from casola.queue.scheduler import async_free, pick_async
from casola.queue.webhooks import WebhookSender, WebhookSigner, webhook_body
from casola.store import Job, JobStatus, JobStore, StoreError
from casola.wire import (
    FLAG_END,
    CheckpointMeta,
    EndMeta,
    ErrorCode,
    ErrorMeta,
    Frame,
    FrameType,
    RequestMeta,
    ResponseMeta,
)
from casola.wire.errors import error_info

__all__ = ["Jobs", "JobsConfig"]  # JobsConfig lives in casola.queue.config; named here too, as before

log = logging.getLogger("casola.jobs")

REQUEST, DATA, END = FrameType.REQUEST, FrameType.DATA, FrameType.END
_CLAIM_BATCH = 32  # claims in flight at once per model (the SQLite writer commits them as a group)


class Jobs:
    """The node's async jobs. What it is given of the node: its configuration, the registry's models
    (live: workers come and go) and `serve_pending`, which hands a worker's free slots to waiting sync
    requests first (called after a claim round held them)."""

    def __init__(
        self,
        queue: QueueConfig,
        store: JobStore,
        signer: WebhookSigner | None,
        models: Mapping[str, ModelEntry],
        serve_pending: Callable[[WorkerEntry], None],
    ) -> None:
        config = queue.jobs
        self.store, self.config, self.models = store, config, models
        self._serve_pending = serve_pending
        self._queue = queue  # lend_idle_sync, lend_reserve
        self.running: dict[str, RunningJob] = {}
        self.stats = {
            "submitted": 0,
            "dispatched": 0,
            "completed": 0,
            "requeued": 0,
            "stale_refused": 0,
            "checkpoints": 0,
            "webhooks_delivered": 0,
        }
        self.maybe_queued: set[str] = set()  # models that may have QUEUED jobs in the store
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.outbound = OutboundPolicy(queue.outbound_allow)  # webhooks; submits are checked with it
        self.webhooks = (
            WebhookSender(
                signer, policy=self.outbound, max_attempts=config.webhook_attempts, on_result=self._webhook_result
            )
            if signer is not None
            else None
        )
        self._owner_prefix = f"{queue.node_id}/"

    # -- life ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and take back what this node leased in a previous life (its workers'
        connections did not survive the restart), then start dispatching."""
        await self.store.open()
        taken = await self.store.release_owner(self._owner_prefix, time.time())
        if taken:
            log.warning("took back %d jobs leased before this node restarted", len(taken))
        self.maybe_queued.update(self.models)
        if self.webhooks is not None:
            self.webhooks.start()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._pump()), loop.create_task(self._sweep())]

    async def stop(self) -> None:
        for t in [*self._loops, *self._tasks]:
            t.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.store.close()

    def spawn(self, coro: object) -> None:
        """Run a store operation as a task the node keeps track of (and cancels on stop)."""
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("job task failed: %r", exc, exc_info=exc)

    def wake(self, model: str | None = None) -> None:
        """A slot freed or a job was queued: let the pump look."""
        if model is not None:
            self.maybe_queued.add(model)
        self._wake.set()

    def owner(self, worker: WorkerEntry) -> str:
        return f"{self._owner_prefix}{worker.node_id}"

    # -- claim and dispatch --------------------------------------------------------------------------

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while await self._claim_round():
                    pass
            except StoreError as exc:
                log.error("claiming jobs failed: %s", exc)
                await asyncio.sleep(self.config.sweep_interval)
                self._wake.set()

    async def _claim_round(self) -> bool:
        """Claim jobs for the models that may have some queued and no sync request waiting: one
        claim per worker, for all such models it serves, for as many jobs as it has slots a job may
        take (one statement); True if any was claimed.

        A claim holds the worker's slots while it runs, so a model whose claim came back short is
        known drained and not claimed for again until a submit or a requeue says otherwise."""
        models = self.models
        wanted = {m for m in self.maybe_queued if (e := models.get(m)) is not None and not e.pending}
        claims: list[tuple[list[str], WorkerEntry, int, asyncio.Future[list[Job]]]] = []
        lease_s = self.config.lease_s
        lend, reserve = self._queue.lend_idle_sync, self._queue.lend_reserve
        seen: set[int] = set()
        for name in wanted:
            for worker in models[name].workers:
                if id(worker) in seen:
                    continue
                seen.add(id(worker))
                n = min(async_free(worker, lend, reserve), _CLAIM_BATCH)
                if n <= 0:
                    continue
                mine = [m for m in worker.models if m in wanted]
                worker.reserved += n
                claim = self.store.claim_many(mine, self.owner(worker), lease_s, time.time(), n)
                claims.append((mine, worker, n, asyncio.ensure_future(claim)))
        if not claims:
            return False
        results = await asyncio.gather(*(f for *_, f in claims), return_exceptions=True)
        got = False
        failed: BaseException | None = None
        for (mine, worker, n, _), jobs in zip(claims, results, strict=True):
            worker.reserved -= n
            if isinstance(jobs, BaseException):
                failed = jobs
                continue
            if len(jobs) < n:
                self.maybe_queued.difference_update(mine)  # drained; a submit or requeue adds it back
            for job in jobs:
                got = True
                self.dispatch(job, worker)
            # Sync requests that arrived while the claim held the slots take what is left at once
            # (nothing else would wake them before the worker's next CREDIT).
            self._serve_pending(worker)
        if failed is not None:
            raise StoreError(f"claim failed: {failed}") from failed
        return got

    def dispatch(self, job: Job, worker: WorkerEntry) -> None:
        """Send a leased job to `worker` (its slot was reserved), or take the lease back at once."""
        link = worker.link
        entry = self.models.get(job.model)
        if not link.is_up or link.conn.send_credit <= 0:
            other = self.pick(job.model)
            if other is None:
                self.spawn(self._release(job.id, job.fence, job.model, "its worker went away before dispatch"))
                return
            worker, link = other, other.link
        sid = link.conn.next_stream_id()
        resume = job.checkpoint or b""
        meta = RequestMeta(
            job.model,
            trace=True,  # the worker's `work` becomes the job's inference_ms
            request_id=job.id,  # a dispatch's log lines name the job
            content_type=job.content_type,
            params=job.params,
            tenant=job.tenant,
            job_id=job.id,
            fence=job.fence,
            attempt=max(job.attempt - 1, 0),
            resume_len=len(resume),
        )
        rj = RunningJob(job, worker, sid, time.time())
        self.running[job.id] = rj
        worker.jobs[sid] = rj
        if entry is not None and job.attempt <= 1:
            entry.signals.started("async", max(0.0, time.time() - job.created_at))
        if resume:  # the checkpoint rides in the REQUEST, the input follows
            link.conn.send(Frame(REQUEST, sid, meta, resume))
            link.conn.send(Frame(DATA, sid, None, job.payload, FLAG_END))
        else:
            link.conn.send(Frame(REQUEST, sid, meta, job.payload, FLAG_END))
        link.flush()
        self.stats["dispatched"] += 1

    # -- from the worker -----------------------------------------------------------------------------

    def on_worker_frame(self, worker: WorkerEntry, rj: RunningJob, frame: Frame) -> None:
        t = frame.type
        if t is FrameType.CHECKPOINT:
            meta = frame.meta
            assert isinstance(meta, CheckpointMeta)
            if meta.fence != rj.fence:
                return self._stale(rj, "checkpoint under a stale fence")
            rj.renewed = time.time()
            self.spawn(self._checkpoint(rj, rj.base_seq + meta.seq, bytes(frame.payload), meta.progress))
            return
        if t is FrameType.ERROR:
            meta = frame.meta
            assert isinstance(meta, ErrorMeta)
            self._forget(rj)
            info = error_info(meta.code)
            if info.retryable or meta.code == ErrorCode.SHUTTING_DOWN:
                self.spawn(self._release(rj.id, rj.fence, rj.model, f"worker {worker.node_id}: {meta.message}"))
            else:
                self.spawn(self._complete(rj, None, error_type=info.type, error=meta.message))
            return
        if t is FrameType.RESPONSE:
            meta = frame.meta
            assert isinstance(meta, ResponseMeta)
            rj.content_type = meta.content_type
        work = None
        if t is END:
            meta = frame.meta
            assert isinstance(meta, EndMeta)
            if meta.fence and meta.fence != rj.fence:
                return self._stale(rj, "result under a stale fence")
            work = meta.timing.get("work")
        elif t is FrameType.RESPONSE and frame.end:
            work = frame.meta.timing.get("work")  # type: ignore[union-attr]
        if len(frame.payload):
            rj.size += len(frame.payload)
            if rj.size > self.config.max_result:
                self._cancel_stream(rj, ErrorCode.PAYLOAD_TOO_LARGE, "result too large")
                self._forget(rj)
                msg = f"the result exceeds {self.config.max_result} bytes"
                self.spawn(self._complete(rj, None, error_type="result_too_large", error=msg))
                return
            rj.chunks.append(frame.payload)
        if frame.end:
            self._forget(rj)
            result = rj.chunks[0] if len(rj.chunks) == 1 else b"".join(rj.chunks)
            self.spawn(self._complete(rj, bytes(result), work_ms=work))

    def on_worker_reset(self, rj: RunningJob, message: str) -> None:
        self._forget(rj)
        self.spawn(self._release(rj.id, rj.fence, rj.model, f"stream reset: {message}"))

    def on_worker_lost(self, worker: WorkerEntry) -> None:
        jobs, worker.jobs = list(worker.jobs.values()), {}
        for rj in jobs:
            if self.running.get(rj.id) is rj:
                del self.running[rj.id]
            self.spawn(self._release(rj.id, rj.fence, rj.model, f"worker {worker.node_id} disconnected"))

    def on_heartbeat(self, worker: WorkerEntry) -> None:
        """Renew the leases of the worker's jobs that are a third of the way to expiry."""
        now = time.time()
        due = now - self.config.lease_s / 3
        rjs = [rj for rj in worker.jobs.values() if rj.renewed <= due]
        if rjs:
            for rj in rjs:
                rj.renewed = now
            self.spawn(self._renew(rjs, now))

    def _forget(self, rj: RunningJob) -> None:
        if self.running.get(rj.id) is rj:  # not a later dispatch of the same job (a new fence)
            del self.running[rj.id]
        if rj.worker.jobs.pop(rj.w_sid, None) is not None and (entry := self.models.get(rj.model)):
            entry.signals.finished(rj.worker.pool, perf_counter() - rj.t0)

    def pick(self, model: str) -> WorkerEntry | None:
        """A worker with a slot an async job may take (async or shared pool; sync when lending)."""
        entry = self.models.get(model)
        if entry is None:
            return None
        return pick_async(entry.workers, self._queue.lend_idle_sync, self._queue.lend_reserve)

    def cancel_dispatch(self, job_id: str, message: str) -> None:
        """The job was cancelled: CANCEL its worker's stream, if it runs here (its fence is stale)."""
        rj = self.running.get(job_id)
        if rj is not None:
            self._cancel_stream(rj, ErrorCode.CANCELLED, message)
            self._forget(rj)

    def _stale(self, rj: RunningJob, why: str) -> None:
        self.stats["stale_refused"] += 1
        log.warning("job %s: %s; cancelling the worker's stream", rj.id, why)
        self._cancel_stream(rj, ErrorCode.STALE_FENCE, why)
        self._forget(rj)

    def _cancel_stream(self, rj: RunningJob, code: int, message: str) -> None:
        link = rj.worker.link
        if link.is_up:
            link.reset_if_open(rj.w_sid, code, message)

    # -- store writes --------------------------------------------------------------------------------

    async def _checkpoint(self, rj: RunningJob, seq: int, data: bytes, progress: float) -> None:
        ok = await self.store.checkpoint(rj.id, rj.fence, seq, data, time.time(), self.config.lease_s, progress or None)
        if ok:
            self.stats["checkpoints"] += 1
        elif self.running.get(rj.id) is rj:
            self._stale(rj, "checkpoint refused by the store (the lease was taken over)")

    async def _renew(self, rjs: list[RunningJob], now: float) -> None:
        refused = set(await self.store.renew_many([(rj.id, rj.fence) for rj in rjs], self.config.lease_s, now))
        for rj in rjs:  # the refused dispatches themselves, not a later dispatch of the same job
            if rj.id in refused and rj.worker.jobs.get(rj.w_sid) is rj:
                self._stale(rj, "lease renewal refused (taken over or cancelled)")

    async def _complete(
        self,
        rj: RunningJob,
        result: bytes | None,
        *,
        work_ms: float | None = None,
        error_type: str = "",
        error: str = "",
    ) -> None:
        ok = await self.store.complete(
            rj.id,
            rj.fence,
            time.time(),
            result=result,
            content_type=rj.content_type if result is not None else "",
            error_type=error_type,
            error=error,
            inference_ms=work_ms,
        )
        if not ok:
            self.stats["stale_refused"] += 1
            log.info("job %s: the result under fence %d was refused (lease taken over)", rj.id, rj.fence)
        else:
            self.stats["completed"] += 1
        self.finished(rj.id, rj.webhook)
        self.wake(rj.model)  # the slot it held is free again (the worker's CREDIT also wakes)

    async def _release(self, job_id: str, fence: int, model: str, why: str) -> None:
        if await self.store.release(job_id, fence, time.time()):
            self.stats["requeued"] += 1
            log.warning("job %s back in the queue: %s", job_id, why)
            job = await self.store.get(job_id, None)
            if job is not None and job.status is JobStatus.COMPLETED:
                self.finished(job_id, bool(job.webhook_url))
        self.wake(model)

    # -- waiting for outcomes ------------------------------------------------------------------------

    def finished(self, job_id: str, webhook: bool) -> None:
        """The job completed (here): wake the long polls and deliver its webhook, if it has one."""
        for fut in self._waiters.pop(job_id, ()):
            if not fut.done():
                fut.set_result(None)
        if webhook and self.webhooks is not None:
            self._wake_webhooks()

    async def get(self, job_id: str, tenant: str, wait_s: float = 0.0) -> Job | None:
        """The tenant's job; with `wait_s`, once it completes or that long passed (long poll).

        The waiter is registered before each read, so a completion between the read and the wait
        is never missed. Jobs completed by another node sharing the store are seen by re-reading
        it every half second."""
        if wait_s <= 0:
            return await self.store.get(job_id, tenant)
        deadline = time.monotonic() + wait_s
        loop = asyncio.get_running_loop()
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(job_id, []).append(fut)
            try:
                job = await self.store.get(job_id, tenant)
                left = deadline - time.monotonic()
                if job is None or job.status is JobStatus.COMPLETED or left <= 0:
                    return job
                try:
                    await asyncio.wait_for(fut, min(left, 0.5))
                except TimeoutError:
                    pass
            finally:
                waiters = self._waiters.get(job_id)
                if waiters is not None and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._waiters[job_id]

    # -- the sweep -----------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        cfg = self.config
        last_purge = 0.0
        while True:
            await asyncio.sleep(cfg.sweep_interval)
            try:
                now = time.time()
                for job in await self.store.requeue_expired(now):
                    rj = self.running.get(job.id)
                    if rj is not None and rj.fence == job.fence:  # not claimed again since (fence + 1)
                        self._stale(rj, "lease expired: the worker made no progress")
                    self.stats["requeued"] += 1
                    if job.status is JobStatus.COMPLETED:
                        self.finished(job.id, bool(job.webhook_url))
                # Other queue nodes on a shared store submit too: look for their jobs now and then.
                # The count also tells which models have jobs to claim: no claim round (which holds
                # the workers' free slots while it runs) for a model with nothing queued.
                depth = await self.store.queued_by_model()
                for name, entry in self.models.items():
                    entry.signals.async_depth = n = depth.get(name, 0)
                    if n:
                        self.maybe_queued.add(name)
                self._wake.set()
                if self.webhooks is not None:
                    await self._deliver_due(now)
                if now - last_purge > 60:
                    last_purge = now
                    if n := await self.store.purge(now, cfg.retention_s):
                        log.info("purged %d jobs past their retention", n)
            except StoreError as exc:
                log.error("job sweep failed: %s", exc)

    # -- webhooks ------------------------------------------------------------------------------------

    def _wake_webhooks(self) -> None:
        self.spawn(self._deliver_due(time.time()))

    async def _deliver_due(self, now: float) -> None:
        sender = self.webhooks
        assert sender is not None
        for job in await self.store.due_webhooks(now, 100):
            ok = not job.error_type
            body = webhook_body(job.id, ok, job.result, job.result_content_type, job.error, job.error_type)
            try:
                sender.submit(job.webhook_url, job.id, body, job.webhook_attempts, tenant=job.tenant)
            except ValueError as exc:  # not an http(s) URL, or a refused address: nothing to retry
                log.warning("job %s: webhook not sent: %s", job.id, exc)
                await self.store.webhook_attempted(job.id, False, now, None)

    async def _webhook_result(self, request_id: str, delivered: bool, attempts: int, next_at: float | None) -> None:
        if delivered:
            self.stats["webhooks_delivered"] += 1
        try:
            await self.store.webhook_attempted(request_id, delivered, time.time(), next_at)
        except StoreError as exc:
            log.error("recording a webhook attempt for %s failed: %s", request_id, exc)
