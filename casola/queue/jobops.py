"""Async job operations from ingresses: submit, status, result, cancel (SPEC §3.8.1).

A submit's input is gathered (bounded by `max_input`), persisted, and only then answered: the
answer means the job is durable. When a worker slot is free and no job of the model waits, the
submit leases the job in the same commit and dispatches it at once. Status and result may wait
(long poll) until the job completes. Every operation sees only the requesting tenant's jobs.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING

from casola.jobview import JOB_VIEW_CT, JobLog, JobView, encode_view
from casola.queue.jobs import Jobs
from casola.store import AuditRecord, Job, JobStatus, NewJob, StoreError
from casola.wire import FLAG_END, Buffer, ErrorCode, ErrorMeta, Frame, FrameType, RequestMeta, ResponseMeta
from casola.wire.meta import is_field_value

if TYPE_CHECKING:
    from casola.net.link import LinkBase

__all__ = ["ANONYMOUS", "JobOp", "Screen"]

POSITION_MAX = 1000  # queued jobs of a model (as last counted) beyond which a submit gives no position
log = logging.getLogger("casola.jobs")

ANONYMOUS = "anonymous"  # the tenant of requests when authentication is off

# Classifies a job's input before it is stored: the audit record of a violation, else None
# (the node's `Filtering.check_job`).
Screen = Callable[[RequestMeta, Buffer], Awaitable[AuditRecord | None]]


class JobOp:
    """One job operation stream from an ingress. Lives in the ingress link's stream table next to
    sync calls; `feed` takes its REQUEST and the submit's DATA/END frames (other operations carry
    no body) and runs the operation once the request direction ends. `screen` classifies a
    submit's input before it is stored."""

    __slots__ = ("chunks", "jobs", "link", "meta", "screen", "sid", "size", "tenant")

    def __init__(self, jobs: Jobs, screen: Screen, link: LinkBase, frame: Frame) -> None:
        meta = frame.meta
        assert isinstance(meta, RequestMeta)
        self.jobs, self.screen, self.link, self.sid, self.meta = jobs, screen, link, frame.stream_id, meta
        self.tenant = meta.tenant or ANONYMOUS
        self.chunks: list[Buffer] = []
        self.size = 0

    def feed(self, frame: Frame) -> None:
        if self.meta.op == "submit" and len(frame.payload):
            self.size += len(frame.payload)
            if self.size > self.jobs.config.max_input:
                msg = f"a job's input is limited to {self.jobs.config.max_input} bytes"
                return self._error(ErrorCode.PAYLOAD_TOO_LARGE, msg)
            self.chunks.append(frame.payload)
        if frame.end:
            self._run()

    def cancel(self) -> None:
        """The ingress gave up on the answer; a submit not yet persisted is dropped (nothing was
        acknowledged, so the client retries with its idempotency key)."""
        self.chunks = []
        self.size = -1

    def _run(self) -> None:
        self.link.tag.pop(self.sid, None)
        if self.size < 0:
            return
        op = self.meta.op
        coro = {"submit": self._submit, "status": self._status, "result": self._result, "cancel": self._cancel}[op]
        self.jobs.spawn(self._guard(coro))

    async def _guard(self, coro: object) -> None:
        try:
            await coro()  # type: ignore[operator]
        except StoreError as exc:
            log.error("job %s failed: %s", self.meta.op, exc)
            self._error(ErrorCode.NO_CAPACITY, f"the job store is unavailable: {exc}", 1000)
        except ValueError as exc:
            self._error(ErrorCode.BAD_REQUEST, str(exc))

    # -- operations ----------------------------------------------------------------------------------

    async def _submit(self) -> None:
        jobs, meta = self.jobs, self.meta
        entry = jobs.models.get(meta.model)
        if entry is None:
            return self._error(ErrorCode.UNKNOWN_MODEL, f"model {meta.model!r} is not served here")
        if meta.content_type and not is_field_value(meta.content_type):  # SPEC §4.3: it may become a header
            raise ValueError(f"content_type has a character not allowed in a header: {meta.content_type[:80]!r}")
        if meta.webhook_url:
            try:
                jobs.outbound.check_url(meta.webhook_url)  # address literals now; names when delivering
            except ValueError as exc:
                raise ValueError(f"webhook URL refused: {exc}") from None
        payload = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        if (rec := await self.screen(meta, payload)) is not None:
            msg = f"the input was classified as violating the content policy (audit id {rec.id})"
            return self._error(ErrorCode.CONTENT_POLICY_VIOLATION, msg)
        spec = NewJob(
            tenant=self.tenant,
            model=meta.model,
            payload=bytes(payload),
            content_type=meta.content_type,
            params=dict(meta.params),
            idempotency_key=meta.idempotency_key,
            webhook_url=meta.webhook_url,
            max_attempts=jobs.config.max_attempts,
            priority=meta.priority,
        )
        # A free slot and nobody ahead in line: lease it in the same commit and dispatch at once.
        worker = None if meta.model in jobs.maybe_queued or entry.pending else jobs.pick(meta.model)
        now = time.time()
        if worker is not None:
            worker.reserved += 1
            try:
                job, created = await jobs.store.submit(
                    spec, now, lease_owner=jobs.owner(worker), lease_s=jobs.config.lease_s
                )
            finally:
                worker.reserved -= 1
        else:
            job, created = await jobs.store.submit(spec, now)
        if created:
            jobs.stats["submitted"] += 1
            entry.signals.arrival("async", perf_counter())
        # The exact position is a count of the jobs ahead (O(backlog)): deep queues answer the submit
        # without it rather than spend milliseconds per submit on it (status polls still give it).
        exact = job.status is JobStatus.QUEUED and entry.signals.async_depth < POSITION_MAX
        position = await jobs.store.queue_position(job.id) if exact else None
        self._answer(encode_view(view_of(job, position)), JOB_VIEW_CT, {"job-created": "1" if created else "0"})
        if created and job.status is JobStatus.RUNNING and worker is not None:
            jobs.dispatch(job, worker)
        elif created:
            jobs.wake(job.model)

    async def _find(self) -> Job | None:
        wait = self.meta.params.get("wait_ms")
        wait_ms = 0.0
        if isinstance(wait, int | float | str) and not isinstance(wait, bool):
            try:
                wait_ms = min(max(float(wait), 0.0), float(self.jobs.config.max_wait_ms))
            except ValueError:
                raise ValueError("wait_ms must be a number of milliseconds") from None
        job = await self.jobs.get(self.meta.job_id, self.tenant, wait_ms / 1000)
        if job is None:
            self._error(ErrorCode.JOB_NOT_FOUND, f"no job {self.meta.job_id!r}")
        return job

    async def _status(self) -> None:
        job = await self._find()
        if job is not None:
            await self._answer_view(job)

    async def _result(self) -> None:
        job = await self._find()
        if job is None:
            return
        if job.status is JobStatus.COMPLETED and not job.error_type and job.result is not None:
            headers = {"job-status": job.status.value}
            if job.inference_ms is not None:
                headers["job-inference-ms"] = f"{job.inference_ms:.3f}"
            self._answer(job.result, job.result_content_type, headers)
        else:
            await self._answer_view(job, {"job-view": "1"})

    async def _cancel(self) -> None:
        jobs = self.jobs
        now = time.time()
        job = await jobs.store.cancel(self.meta.job_id, self.tenant, now, force=True)
        if job is None:
            return self._error(ErrorCode.JOB_NOT_FOUND, f"no job {self.meta.job_id!r}")
        cancelled_now = job.completed_at == now and job.error_type == "cancelled"
        if cancelled_now:  # CANCEL reaches the worker; its fence is stale now
            jobs.cancel_dispatch(job.id, "job cancelled by its tenant")
            jobs.finished(job.id, bool(job.webhook_url))
        await self._answer_view(job, {"job-cancelled": "1" if cancelled_now else "0"})

    # -- answers -------------------------------------------------------------------------------------

    async def _answer_view(self, job: Job, headers: dict[str, str] | None = None) -> None:
        position = await self.jobs.store.queue_position(job.id) if job.status is JobStatus.QUEUED else None
        h = {"job-status": job.status.value}
        if headers:
            h.update(headers)
        self._answer(encode_view(view_of(job, position)), JOB_VIEW_CT, h)

    def _answer(self, payload: bytes, content_type: str, headers: dict[str, str]) -> None:
        link, sid = self.link, self.sid
        if not link.is_up or not link.conn.is_open(sid):
            return
        link.send(Frame(FrameType.RESPONSE, sid, ResponseMeta(content_type, headers), payload, FLAG_END))

    def _error(self, code: int, message: str, retry_after_ms: int = 0) -> None:
        self.link.tag.pop(self.sid, None)
        self.size = -1
        if self.link.is_up and self.link.conn.is_open(self.sid):
            self.link.send(Frame(FrameType.ERROR, self.sid, ErrorMeta(code, message, retry_after_ms)))


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()


def view_of(job: Job, position: int | None) -> JobView:
    """The job view of a stored job; its log is told from the job's own fields."""
    logs = [JobLog(message="job submitted", timestamp=_iso(job.created_at))]
    if job.started_at is not None:
        logs.append(JobLog(message="job started on a worker", timestamp=_iso(job.started_at)))
    if job.attempt > 1:
        logs.append(JobLog(message=f"redispatched after a lost lease (attempt {job.attempt})", level="WARNING"))
    if job.checkpoint_seq:
        logs.append(JobLog(message=f"checkpoint {job.checkpoint_seq} stored ({job.progress:.0%} done)"))
    if job.completed_at is not None:
        what = f"job failed: {job.error_type}: {job.error}" if job.error_type else "job completed"
        logs.append(JobLog(message=what, level="ERROR" if job.error_type else "INFO", timestamp=_iso(job.completed_at)))
    return JobView(
        request_id=job.id,
        model=job.model,
        status=job.status.value,
        queue_position=position,
        progress=1.0 if job.status is JobStatus.COMPLETED and not job.error_type else job.progress,
        attempt=job.attempt,
        created_at=job.created_at,
        started_at=job.started_at,
        completed_at=job.completed_at,
        inference_ms=job.inference_ms,
        error=job.error,
        error_type=job.error_type,
        result_content_type=job.result_content_type,
        logs=logs,
    )
