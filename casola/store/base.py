"""The async job store's contract: job records, their three states, and the operations on them.

An async job (DESIGN "Two contracts: sync and async") is persisted before dispatch and
acknowledged with an unguessable id. A queue node claims it for a worker under a LEASE that carries
a FENCING token (`fence`, +1 per claim); heartbeats and checkpoints renew the lease, and every
fenced operation with a stale token is refused and changes nothing, so a worker whose lease was
taken over can neither renew, checkpoint nor complete the job. An expired or released lease puts
the job back in the queue, keeping its last checkpoint, until `max_attempts` dispatches have been
spent; then it completes with `error_type` "worker_error". The result is recorded exactly once.

Invariants every backend keeps:

- QUEUED: no lease (`lease_owner` "", `lease_expires` None), `attempt < max_attempts`.
- RUNNING: a lease; `fence` is the token of the one dispatch allowed to write.
- COMPLETED: final; nothing changes its outcome. Only its webhook delivery state moves on, and
  `purge` deletes it after the retention.
- Webhooks: every path that completes a job with a `webhook_url` makes its delivery due at once
  (`webhook_next` = the completion time) in the same statement, so a queue node that dies right
  after completing still delivers it later. `webhook_next` is set only on a COMPLETED job with a
  `webhook_url` that is not `webhook_done`. Delivery is at least once.
- A tenant sees only its own jobs; `tenant=None` is the queue node's internal view.
- Fair claim order (start-time fair queuing): `submit` gives each job a virtual tag `vtag` in the
  same statement, per model: the model's virtual clock is the lowest tag QUEUED minus 1 (0 when
  none is queued), and the job's tag is 1 + the greater of that clock and the highest tag its
  tenant has QUEUED for the model. A tenant that floods the queue gets tags 1, 2, 3, ... while one
  arriving later starts at the head's tag, so their jobs interleave one by one. Claims take the
  highest priority, then the lowest tag, then the oldest. A job put back in the queue keeps its tag.
- Content-filter verdicts are kept as `AuditRecord`s beside the jobs, under the same retention.

Time is passed in (`now`, unix seconds); no store reads a clock.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from typing import Any, Final, Protocol

import msgspec

from casola.wire.errors import CasolaError

__all__ = [
    "AUDIT_COLUMNS",
    "CANCELLED",
    "JOB_COLUMNS",
    "WORKER_ERROR",
    "AuditRecord",
    "Job",
    "JobStatus",
    "JobStore",
    "NewJob",
    "StoreError",
    "audit_from_row",
    "check_models",
    "job_from_row",
    "job_to_row",
    "new_job",
]

CANCELLED: Final = "cancelled"  # error_type of a job cancelled by its tenant
WORKER_ERROR: Final = "worker_error"  # error_type of a job whose workers kept dying (max_attempts)


class StoreError(CasolaError):
    """The store's backend failed (I/O, connection, lock timeout) or the store is not open.

    Raised from the backend's own exception with `from exc`; whether the operation took effect is
    unknown when the failure is a lost connection, as with any database.
    """


class JobStatus(enum.StrEnum):
    """A job's state, named as fal's queue API names them."""

    QUEUED = "IN_QUEUE"
    RUNNING = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class NewJob(msgspec.Struct, kw_only=True):
    """What a tenant submits. `params` must be JSON values; `priority`: higher is claimed first."""

    tenant: str
    model: str
    payload: bytes
    content_type: str = ""
    params: dict[str, Any] = {}
    idempotency_key: str = ""
    webhook_url: str = ""
    max_attempts: int = 3
    priority: int = 0


class Job(msgspec.Struct, kw_only=True):
    """One stored job. The field order is the column order of `casola_jobs` (`JOB_COLUMNS`).

    `attempt` counts dispatches so far; `fence` is 0 until the first claim and +1 per claim;
    `lease_owner` is the worker holding the lease ("" when queued; the last holder once completed);
    `checkpoint` is opaque bytes a redispatch resumes from, `checkpoint_seq` its sequence number.
    `inference_ms` is the `work` time the worker reported for the recorded result. The webhook of
    a completed job: `webhook_attempts` deliveries tried so far, `webhook_next` when the next one
    is due (unix seconds; None: nothing due), `webhook_done` once delivered or given up.
    `vtag` is the job's virtual tag in its model's fair claim order (set by `submit`; see above).
    """

    id: str
    tenant: str
    model: str
    status: JobStatus
    payload: bytes
    content_type: str = ""
    params: dict[str, Any] = {}
    idempotency_key: str = ""
    webhook_url: str = ""
    priority: int = 0
    max_attempts: int = 3
    created_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    attempt: int = 0
    fence: int = 0
    lease_owner: str = ""
    lease_expires: float | None = None
    checkpoint: bytes | None = None
    checkpoint_seq: int = 0
    progress: float = 0.0
    result: bytes | None = None
    result_content_type: str = ""
    error_type: str = ""
    error: str = ""
    cancel_requested: bool = False
    inference_ms: float | None = None  # the fields below came with schema version 2
    webhook_attempts: int = 0
    webhook_next: float | None = None
    webhook_done: bool = False
    vtag: int = 0  # schema version 3


JOB_COLUMNS: Final[tuple[str, ...]] = Job.__struct_fields__


class AuditRecord(msgspec.Struct, kw_only=True):
    """One content-filter verdict, kept for audit. The field order is the column order of
    `casola_audits` after its `seq` (`AUDIT_COLUMNS`).

    `outcome`: "aborted" (the violation won the race with the response), "late" (the response won;
    the verdict was recorded after), "blocked" (the block policy refused before dispatch), "clean"
    or "error".
    """

    id: str  # unique, chosen by the caller (e.g. "<node_id>-<counter>")
    at: float  # unix seconds when the verdict arrived
    tenant: str
    model: str
    request_id: str = ""  # the job id for async jobs, "" for sync requests
    policy: str = ""  # off | race | block
    outcome: str = ""
    flagged: bool = False
    label: str = ""
    score: float = 0.0
    classifier: str = ""
    filter_ms: float = 0.0  # classification time
    before_response: bool = False  # the verdict arrived before the response finished
    detail: str = ""  # error text or anything else worth keeping


AUDIT_COLUMNS: Final[tuple[str, ...]] = AuditRecord.__struct_fields__

_INT32_MAX: Final = 2**31 - 1  # priority and max_attempts are INTEGER columns in PostgreSQL
_params_encoder = msgspec.json.Encoder()
_params_decoder = msgspec.json.Decoder(dict[str, Any])


class _Row(Protocol):
    def __getitem__(self, index: int, /) -> Any: ...


def new_job(spec: NewJob, job_id: str, now: float, *, lease_owner: str = "", lease_s: float = 0.0) -> Job:
    """The QUEUED record for a submitted job, or with `lease_owner` the RUNNING record of its first claim.

    Raises:
        ValueError: `tenant` or `model` is empty, `max_attempts` < 1, or a number outside 32 bits.
    """
    if not spec.tenant or not spec.model:
        raise ValueError("a job needs a tenant and a model")
    if not 1 <= spec.max_attempts <= _INT32_MAX:
        raise ValueError(f"max_attempts must be between 1 and 2**31-1, not {spec.max_attempts}")
    if not -_INT32_MAX <= spec.priority <= _INT32_MAX:
        raise ValueError(f"priority must fit in 32 bits, not {spec.priority}")
    job = Job(
        id=job_id,
        tenant=spec.tenant,
        model=spec.model,
        status=JobStatus.QUEUED,
        payload=spec.payload,
        content_type=spec.content_type,
        params=spec.params,
        idempotency_key=spec.idempotency_key,
        webhook_url=spec.webhook_url,
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        created_at=now,
    )
    if not lease_owner:
        return job
    return msgspec.structs.replace(
        job,
        status=JobStatus.RUNNING,
        started_at=now,
        attempt=1,
        fence=1,
        lease_owner=lease_owner,
        lease_expires=now + lease_s,
    )


def job_to_row(job: Job) -> tuple[Any, ...]:
    """`job` as column values in `JOB_COLUMNS` order (params as JSON text, status as its name).

    Raises:
        ValueError: `params` holds something JSON cannot carry.
    """
    values = list(msgspec.structs.astuple(job))
    values[3] = job.status.value
    try:
        values[6] = _params_encoder.encode(job.params).decode()
    except (TypeError, msgspec.EncodeError) as exc:
        raise ValueError(f"params must be JSON values: {exc}") from exc
    return tuple(values)


def _real(value: float | None) -> float | None:
    return None if value is None else float(value)


def job_from_row(row: _Row) -> Job:
    """The `Job` for a row selected as `JOB_COLUMNS` (a sqlite3 tuple or an asyncpg Record).

    Times go through float(): SQLite's RETURNING can hand back an integral REAL as an int.
    """
    return Job(
        id=row[0],
        tenant=row[1],
        model=row[2],
        status=JobStatus(row[3]),
        payload=bytes(row[4]),
        content_type=row[5],
        params=_params_decoder.decode(row[6]),
        idempotency_key=row[7],
        webhook_url=row[8],
        priority=row[9],
        max_attempts=row[10],
        created_at=float(row[11]),
        started_at=_real(row[12]),
        completed_at=_real(row[13]),
        attempt=row[14],
        fence=row[15],
        lease_owner=row[16],
        lease_expires=_real(row[17]),
        checkpoint=None if row[18] is None else bytes(row[18]),
        checkpoint_seq=row[19],
        progress=float(row[20]),
        result=None if row[21] is None else bytes(row[21]),
        result_content_type=row[22],
        error_type=row[23],
        error=row[24],
        cancel_requested=bool(row[25]),
        inference_ms=_real(row[26]),
        webhook_attempts=row[27],
        webhook_next=_real(row[28]),
        webhook_done=bool(row[29]),
        vtag=row[30],
    )


def audit_from_row(row: _Row) -> AuditRecord:
    """The `AuditRecord` for a row selected as `AUDIT_COLUMNS` (a sqlite3 tuple or an asyncpg Record)."""
    return AuditRecord(
        id=row[0],
        at=float(row[1]),
        tenant=row[2],
        model=row[3],
        request_id=row[4],
        policy=row[5],
        outcome=row[6],
        flagged=bool(row[7]),
        label=row[8],
        score=float(row[9]),
        classifier=row[10],
        filter_ms=float(row[11]),
        before_response=bool(row[12]),
        detail=row[13],
    )


class JobStore(abc.ABC):
    """The persistence of async jobs, shared by every queue node that opens the same store.

    Every method but `open` raises `StoreError` when the store is not open or its backend fails;
    no other exception escapes except the `ValueError`s documented per method.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply the schema migrations this store lacks, in one transaction.

        Opening an open store, or a store whose schema is current, changes nothing.

        Raises:
            StoreError: the backend cannot be reached, or its schema is newer than this code.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish the operations already submitted, then disconnect. Closing twice is a no-op."""

    @abc.abstractmethod
    async def submit(self, job: NewJob, now: float, *, lease_owner: str = "", lease_s: float = 0.0) -> tuple[Job, bool]:
        """Persist a new QUEUED job; durable when this returns.

        With `lease_owner` (a worker slot is free at submit time), the job is stored already
        claimed: RUNNING, leased to `lease_owner` until `now + lease_s`, attempt 1, fence 1,
        started at `now`; one durable write instead of a submit and a claim.

        The job's `vtag` (the fair claim order, see the module) is computed in the same statement
        or transaction, whether it is queued or leased (a leased job released later keeps it).

        Returns:
            (job, created). A job with the same (tenant, idempotency_key) already stored is
            returned as it is now, with created False, and is not leased.

        Raises:
            ValueError: see `new_job` and `job_to_row`.
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def get(self, job_id: str, tenant: str | None) -> Job | None:
        """The job, or None if there is none or it is not `tenant`'s (None: any tenant's).

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def claim(self, models: Sequence[str], owner: str, lease_s: float, now: float) -> Job | None:
        """Lease the next QUEUED job of one of `models` to `owner`; None if there is none.

        The next job is the one with the highest priority, then the lowest `vtag` (tenants take
        turns), then the oldest (`created_at`, then submission order). It becomes RUNNING with
        attempt+1, fence+1 and a lease until `now + lease_s`. Concurrent claimers, in this process
        or in other queue nodes, never get the same job.

        Raises:
            ValueError: `models` is a str rather than a sequence of names.
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def claim_many(self, models: Sequence[str], owner: str, lease_s: float, now: float, limit: int) -> list[Job]:
        """Lease up to `limit` QUEUED jobs at once, in claim order, as `claim` would one after
        another (in one statement or transaction). Fewer than `limit`: the queue is drained.

        Raises:
            ValueError: `models` is a str.
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def renew(self, job_id: str, fence: int, lease_s: float, now: float, progress: float | None = None) -> bool:
        """Extend the lease to `now + lease_s` (and record `progress` if given).

        Returns:
            False, changing nothing, if the job is not RUNNING under `fence`.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def renew_many(self, items: Sequence[tuple[str, int]], lease_s: float, now: float) -> list[str]:
        """Extend to `now + lease_s`, in one transaction, the leases of the (job_id, fence) pairs.

        The queue node renews every lease a worker holds when that worker's HEARTBEAT arrives.

        Returns:
            The ids refused, changing nothing for them: not RUNNING under that fence (unknown,
            completed, requeued or claimed again since).

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def checkpoint(
        self, job_id: str, fence: int, seq: int, data: bytes, now: float, lease_s: float, progress: float | None = None
    ) -> bool:
        """Store `data` as the job's checkpoint if `seq` is newer than the stored one; renew the lease
        and record `progress` if given (one write).

        Returns:
            False, changing nothing, if the job is not RUNNING under `fence`. An older or repeated
            `seq` under the right fence renews the lease, keeps the stored checkpoint and returns True.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def complete(
        self,
        job_id: str,
        fence: int,
        now: float,
        *,
        result: bytes | None = None,
        content_type: str = "",
        error_type: str = "",
        error: str = "",
        inference_ms: float | None = None,
    ) -> bool:
        """Record the job's outcome, exactly once: a result, or an error (`error_type` non-empty).

        `inference_ms` is the `work` time the worker reported, stored with the outcome. A job with
        a `webhook_url` becomes due for delivery at once (`webhook_next = now`), in the same write.
        A job whose cancel was requested completes with whatever the caller records here (the
        queue node passes error_type "cancelled" when the cancelled stream ends without a result).

        Returns:
            False, changing nothing, if the job is not RUNNING under `fence` (a second call included).

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def requeue_expired(self, now: float) -> list[Job]:
        """Take back every lease that expired by `now` (the worker died or hung).

        A job with attempts left goes back to QUEUED (lease cleared, checkpoint kept); one without
        completes with error_type "worker_error"; one whose cancel was requested completes as
        cancelled.

        Returns:
            The jobs changed, in their new state.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def release_owner(self, owner_prefix: str, now: float) -> list[Job]:
        """Take back every lease whose `lease_owner` starts with `owner_prefix`, as if it had expired.

        A restarted queue node takes back the leases of its previous life at once rather than
        waiting for them to expire; each job goes where `requeue_expired` would send it. The prefix
        is compared literally (no wildcards).

        Returns:
            The jobs changed, in their new state.

        Raises:
            ValueError: `owner_prefix` is empty (it would take back every node's leases).
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def release(self, job_id: str, fence: int, now: float) -> bool:
        """Take back the lease now, as if it had expired (the worker's connection dropped).

        Returns:
            False, changing nothing, if the job is not RUNNING under `fence`.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def cancel(self, job_id: str, tenant: str | None, now: float, *, force: bool = False) -> Job | None:
        """Cancel a job: QUEUED completes at once as "cancelled"; RUNNING gets `cancel_requested`.

        The caller CANCELs the worker of a RUNNING job and completes it when the stream ends. With
        `force`, a RUNNING job completes as cancelled at once (its worker's fence goes stale for
        every later write). A COMPLETED job is returned unchanged.

        Returns:
            The job in its new state; None if there is none or it is not `tenant`'s.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def due_webhooks(self, now: float, limit: int, hold_s: float = 30.0) -> list[Job]:
        """The completed jobs whose webhook delivery is due by `now`: tenants in turn, and each
        tenant's oldest `webhook_next` first (one tenant's backlog does not hold up another's).

        At most `limit` jobs; their `webhook_next` moves to `now + hold_s` in the same atomic step,
        so another queue node asking meanwhile does not get them too. If the caller dies before
        `webhook_attempted`, they come due again after the hold.

        Returns:
            The jobs as now stored (`webhook_next` = `now + hold_s`).

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def webhook_attempted(self, job_id: str, delivered: bool, now: float, next_at: float | None) -> bool:
        """Record one delivery attempt of the job's webhook (`webhook_attempts` + 1).

        Delivered: `webhook_done`, nothing more due. Not delivered: the next attempt is due at
        `next_at`, or with `next_at` None the delivery is given up (`webhook_done`). A job already
        done stays done (another node's attempt may have delivered it).

        Returns:
            False, changing nothing, if there is no such job, or it is not COMPLETED with a webhook.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def queue_position(self, job_id: str) -> int | None:
        """How many QUEUED jobs of the same model will be claimed before this one; None if not queued.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def purge(self, now: float, retention_s: float) -> int:
        """Delete the jobs completed before `now - retention_s`, and the audit records from before
        then (`at < now - retention_s`), in one transaction.

        Returns:
            How many jobs were deleted (audit records are not counted).

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """The number of jobs per status value ("IN_QUEUE", ...), zeros included, for metrics.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def queued_by_model(self) -> dict[str, int]:
        """The number of QUEUED jobs per model, for a queue-depth signal; models with none are absent.

        Raises:
            StoreError: the backend failed.
        """

    @abc.abstractmethod
    async def record_audit(self, records: Sequence[AuditRecord]) -> None:
        """Store content-filter verdicts, all in one transaction; durable when this returns.

        A record whose `id` is already stored (a retry) is skipped, the stored one kept.

        Raises:
            StoreError: the backend failed (nothing was stored), or a field has the wrong type.
        """

    @abc.abstractmethod
    async def audits(self, *, tenant: str | None = None, since: float = 0.0, limit: int = 100) -> list[AuditRecord]:
        """The audit records with `at >= since` (only `tenant`'s when given), oldest first, at most `limit`.

        Raises:
            StoreError: the backend failed.
        """


def check_models(models: Sequence[str]) -> list[str]:
    """`models` as a list; a bare string is refused rather than read as its characters.

    Raises:
        ValueError: `models` is a str.
    """
    if isinstance(models, str):
        raise ValueError("claim takes a sequence of model names, not one str")
    return list(models)
