"""The shared job store: PostgreSQL through an asyncpg pool, for several queue nodes at once.

Every operation is one statement (a submit with an idempotency key at most three; `record_audit`
one executemany in one transaction), so there are no client-side transactions to hold open. Claims
lock the next job with `FOR UPDATE SKIP LOCKED`, so concurrent claimers on any node never wait for
each other nor get the same job; expiry sweeps do the same, so two nodes sweeping at once neither
deadlock nor change a job twice. Fenced updates
are `UPDATE ... WHERE id = $1 AND fence = $2 AND status = 'IN_PROGRESS'`: a stale token matches no
row. Tables are prefixed `casola_`; a URL may name a schema (`?schema=name`), created if missing.
Durability is PostgreSQL's: a statement returns after its commit is flushed
(`synchronous_commit=on`, the default).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import msgspec

from casola.store import migrations
from casola.store.base import (
    AUDIT_COLUMNS,
    CANCELLED,
    JOB_COLUMNS,
    WORKER_ERROR,
    AuditRecord,
    Job,
    JobStatus,
    JobStore,
    NewJob,
    StoreError,
    audit_from_row,
    check_models,
    job_from_row,
    job_to_row,
    new_job,
)

__all__ = ["PostgresJobStore"]

# Taken for the length of a migration so that nodes opening the store at once apply it once.
_MIGRATION_LOCK: Final = 0x636173_6F6C61  # "casola"
_SCHEMA_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# A submit whose idempotency key conflicts with a job purged in between inserts again; bounded.
_SUBMIT_TRIES: Final = 3

_COLS: Final = ", ".join(JOB_COLUMNS)
_SELECT: Final = f"SELECT {_COLS} FROM casola_jobs"
# The job's virtual tag (casola.store.base), computed in the INSERT from $2 (tenant) and $3 (model);
# each subselect is one probe of a partial index (migration 3). Two nodes inserting for the same
# model at once each read a snapshot without the other's job, so they may compute equal tags (or a
# tenant's two jobs the same tag): that costs only the exactness of the fairness, never a job (ties
# go by created_at, seq). Locking the model's queue for every submit would serialize submits.
_VTAG: Final = (
    "GREATEST(COALESCE((SELECT MAX(vtag) FROM casola_jobs"
    " WHERE status = 'IN_QUEUE' AND model = $3 AND tenant = $2), 0),"
    " COALESCE((SELECT MIN(vtag) FROM casola_jobs WHERE status = 'IN_QUEUE' AND model = $3) - 1, 0)) + 1"
)
# Takes every column but the last, vtag, as $1 ... $N-1 in JOB_COLUMNS order; returns the tag.
_INSERT: Final = (
    f"INSERT INTO casola_jobs ({_COLS}) VALUES ({', '.join(f'${i}' for i in range(1, len(JOB_COLUMNS)))}, {_VTAG})"
)
_INSERT_ONE: Final = f"{_INSERT} RETURNING vtag"
_INSERT_ONCE: Final = (
    f"{_INSERT} ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key <> '' DO NOTHING RETURNING vtag"
)
_BY_KEY: Final = f"{_SELECT} WHERE tenant = $1 AND idempotency_key = $2"
_GET: Final = f"{_SELECT} WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)"
# Claims: {models} is `model = $1::text` for one model, which reads the claim index
# casola_jobs_queued in claim order and stops at the first unlocked row(s); for several models it is
# `model = ANY($1::text[])`, which PostgreSQL reads as an unordered index scan and then sorts.
_CLAIM: Final = (
    "UPDATE casola_jobs SET status = 'IN_PROGRESS', attempt = attempt + 1, fence = fence + 1,"
    " lease_owner = $2, lease_expires = $3, started_at = COALESCE(started_at, $4)"
    " WHERE id = (SELECT id FROM casola_jobs WHERE status = 'IN_QUEUE' AND {models}"
    " ORDER BY priority DESC, vtag, created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
    f" AND status = 'IN_QUEUE' RETURNING {_COLS}"
)
_CLAIM_MANY: Final = (  # a CTE: the picked ids are computed once (an IN (... LIMIT) may not be)
    "WITH picked AS (SELECT id AS picked_id FROM casola_jobs WHERE status = 'IN_QUEUE'"
    " AND {models} ORDER BY priority DESC, vtag, created_at, seq LIMIT $5 FOR UPDATE SKIP LOCKED)"
    " UPDATE casola_jobs SET status = 'IN_PROGRESS', attempt = attempt + 1, fence = fence + 1,"
    " lease_owner = $2, lease_expires = $3, started_at = COALESCE(started_at, $4)"
    f" FROM picked WHERE id = picked_id AND status = 'IN_QUEUE' RETURNING {_COLS}, seq"
)
# (one model, several models)
_CLAIMS: Final = tuple(_CLAIM.format(models=m) for m in ("model = $1::text", "model = ANY($1::text[])"))
_CLAIMS_MANY: Final = tuple(_CLAIM_MANY.format(models=m) for m in ("model = $1::text", "model = ANY($1::text[])"))
_FENCED: Final = "id = $1 AND fence = $2 AND status = 'IN_PROGRESS'"
_RENEW: Final = f"UPDATE casola_jobs SET lease_expires = $3, progress = COALESCE($4, progress) WHERE {_FENCED}"
_CHECKPOINT: Final = (
    "UPDATE casola_jobs SET lease_expires = $3, progress = COALESCE($6, progress),"
    " checkpoint = CASE WHEN $4::bigint > checkpoint_seq THEN $5::bytea ELSE checkpoint END,"
    f" checkpoint_seq = GREATEST(checkpoint_seq, $4::bigint) WHERE {_FENCED}"
)
# Locks the leases (id, fence) of $1 and $2 in id order, so that two multi-row statements never deadlock.
_RENEW_MANY: Final = (
    "UPDATE casola_jobs SET lease_expires = $3 WHERE id IN (SELECT j.id FROM casola_jobs j"
    " JOIN unnest($1::text[], $2::bigint[]) AS w(id, fence) ON j.id = w.id AND j.fence = w.fence"
    " WHERE j.status = 'IN_PROGRESS' ORDER BY j.id FOR UPDATE OF j) AND status = 'IN_PROGRESS' RETURNING id, fence"
)
_COMPLETE: Final = (
    "UPDATE casola_jobs SET status = 'COMPLETED', completed_at = $3, lease_expires = NULL,"
    " result = $4, result_content_type = $5, error_type = $6, error = $7, inference_ms = $8,"
    f" webhook_next = CASE WHEN webhook_url <> '' THEN $3::double precision END WHERE {_FENCED}"
)
# Taking a lease back; $1 now, $2 "cancelled", $3 "worker_error"; {where} picks the leases.
_ENDS: Final = "(attempt >= max_attempts OR cancel_requested)"
_TAKE_BACK: Final = (
    f"UPDATE casola_jobs SET status = CASE WHEN {_ENDS} THEN 'COMPLETED' ELSE 'IN_QUEUE' END,"
    f" completed_at = CASE WHEN {_ENDS} THEN $1::double precision END,"
    f" lease_owner = CASE WHEN {_ENDS} THEN lease_owner ELSE '' END, lease_expires = NULL,"
    " error_type = CASE WHEN cancel_requested THEN $2::text WHEN attempt >= max_attempts THEN $3::text"
    " ELSE error_type END,"
    " error = CASE WHEN cancel_requested THEN 'cancelled by request' WHEN attempt >= max_attempts"
    " THEN 'gave up after ' || attempt || ' attempts: the worker died, hung or lost its connection'"
    " ELSE error END,"
    f" webhook_next = CASE WHEN {_ENDS} AND webhook_url <> '' THEN $1::double precision ELSE webhook_next END"
    f" WHERE {{where}} RETURNING {_COLS}"
)
_EXPIRED: Final = _TAKE_BACK.format(
    where="id IN (SELECT id FROM casola_jobs WHERE status = 'IN_PROGRESS' AND lease_expires <= $1"
    " FOR UPDATE SKIP LOCKED)"
)
_RELEASE: Final = _TAKE_BACK.format(where="id = $4 AND fence = $5 AND status = 'IN_PROGRESS'")
# $4 the owner prefix, compared with left() rather than LIKE: '%' and '_' are literal. Locks in id
# order (see _RENEW_MANY) and waits for locked rows: these leases are the caller's own.
_OWNED_BY: Final = _TAKE_BACK.format(
    where="id IN (SELECT id FROM casola_jobs WHERE status = 'IN_PROGRESS'"
    " AND left(lease_owner, length($4::text)) = $4::text ORDER BY id FOR UPDATE) AND status = 'IN_PROGRESS'"
)
_STOPS: Final = "(status = 'IN_QUEUE' OR $4::boolean)"  # cancel: completes at once rather than asking
_CANCEL: Final = (
    "UPDATE casola_jobs SET cancel_requested = TRUE,"
    f" status = CASE WHEN {_STOPS} THEN 'COMPLETED' ELSE status END,"
    f" completed_at = CASE WHEN {_STOPS} THEN $3::double precision ELSE completed_at END,"
    f" lease_expires = CASE WHEN {_STOPS} THEN NULL ELSE lease_expires END,"
    f" error_type = CASE WHEN {_STOPS} THEN $5::text ELSE error_type END,"
    f" error = CASE WHEN {_STOPS} THEN 'cancelled by request' ELSE error END,"
    f" webhook_next = CASE WHEN {_STOPS} AND webhook_url <> '' THEN $3::double precision ELSE webhook_next END"
    f" WHERE id = $1 AND status <> 'COMPLETED' AND ($2::text IS NULL OR tenant = $2) RETURNING {_COLS}"
)
_POSITION: Final = (
    "SELECT (SELECT COUNT(*) FROM casola_jobs q WHERE q.status = 'IN_QUEUE' AND q.model = j.model"
    " AND (q.priority > j.priority OR (q.priority = j.priority"
    " AND (q.vtag, q.created_at, q.seq) < (j.vtag, j.created_at, j.seq))))"
    " FROM casola_jobs j WHERE j.id = $1 AND j.status = 'IN_QUEUE'"
)
# $1 now, $2 limit, $3 held until. SKIP LOCKED: what another node is taking at once is its own.
# Tenants in turn, oldest first within each (see sqlite_sql.DUE_WEBHOOKS). Each tenant's oldest due
# rows are locked with SKIP LOCKED (what another node is picking is left to it; no window function
# may share a level with FOR UPDATE, so the turns are numbered one level up), then the batch is held.
_DUE: Final = "status = 'COMPLETED' AND webhook_url <> '' AND NOT webhook_done AND webhook_next <= $1"
_DUE_WEBHOOKS: Final = (
    f"WITH tenants AS (SELECT DISTINCT tenant AS t FROM casola_jobs WHERE {_DUE}),"
    " locked AS (SELECT j.id AS l_id, j.webhook_next AS l_at, j.seq AS l_seq, tenants.t AS l_tenant FROM tenants,"
    f" LATERAL (SELECT id, webhook_next, seq FROM casola_jobs WHERE tenant = tenants.t AND {_DUE}"
    " ORDER BY webhook_next, seq LIMIT $2 FOR UPDATE SKIP LOCKED) j),"
    " picked AS (SELECT l_id, l_at, l_seq, ROW_NUMBER() OVER (PARTITION BY l_tenant ORDER BY l_at, l_seq) AS turn"
    " FROM locked ORDER BY turn, l_at, l_seq LIMIT $2),"
    " held AS (UPDATE casola_jobs SET webhook_next = $3 FROM picked WHERE id = l_id"
    f" RETURNING {', '.join(f'casola_jobs.{c}' for c in JOB_COLUMNS)}, turn, l_at, l_seq)"
    f" SELECT {_COLS} FROM held ORDER BY turn, l_at, l_seq"
)
# Jobs then audit records from before $1, in one statement (a data-modifying CTE always runs).
_PURGE: Final = (
    "WITH audits AS (DELETE FROM casola_audits WHERE at < $1)"
    " DELETE FROM casola_jobs WHERE status = 'COMPLETED' AND completed_at < $1"
)
_QUEUED_BY_MODEL: Final = "SELECT model, COUNT(*) FROM casola_jobs WHERE status = 'IN_QUEUE' GROUP BY model"
# Audit records: inserted in AUDIT_COLUMNS order, a known id skipped; read oldest first.
_AUDIT_COLS: Final = ", ".join(AUDIT_COLUMNS)
_INSERT_AUDIT: Final = (
    f"INSERT INTO casola_audits ({_AUDIT_COLS}) VALUES ({', '.join(f'${i}' for i in range(1, len(AUDIT_COLUMNS) + 1))})"
    " ON CONFLICT (id) DO NOTHING"
)
_AUDITS: Final = f"SELECT {_AUDIT_COLS} FROM casola_audits WHERE at >= $1 ORDER BY at, seq LIMIT $2"
_AUDITS_OF: Final = f"SELECT {_AUDIT_COLS} FROM casola_audits WHERE tenant = $3 AND at >= $1 ORDER BY at, seq LIMIT $2"
# $2 is "delivered or given up"; a job already done stays done.
_WEBHOOK_ATTEMPTED: Final = (
    "UPDATE casola_jobs SET webhook_attempts = webhook_attempts + 1, webhook_done = webhook_done OR $2::boolean,"
    " webhook_next = CASE WHEN webhook_done OR $2::boolean THEN NULL ELSE $3::double precision END"
    " WHERE id = $1 AND status = 'COMPLETED' AND webhook_url <> ''"
)


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Raise the backend's failures as `StoreError` (STYLE §5: translate at the boundary)."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"postgresql {what} failed: {exc}") from exc


def _claim_sql(statements: tuple[str, ...], names: list[str]) -> tuple[str, str | list[str]]:
    """The claim statement for `names` and its $1: one model by equality (index order), else an array."""
    if len(names) == 1:
        return statements[0], names[0]
    return statements[1], names


def _changed(status: str) -> int:
    """The row count of an asyncpg command status ("UPDATE 1", "DELETE 3")."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresJobStore(JobStore):
    """A `JobStore` in PostgreSQL, shared by every queue node that opens the same database."""

    def __init__(self, dsn: str, *, schema: str | None = None, min_size: int = 2, max_size: int = 16) -> None:
        """Args:
        dsn: `postgresql://user@host:port/db`; a `schema=name` query parameter works as `schema`.
        schema: where the tables live (created if missing); None: the server's search_path.
        min_size, max_size: the connection pool's bounds.

        Raises:
            ValueError: the schema is not a plain identifier.
        """
        parts = urlsplit(dsn)
        query = parse_qsl(parts.query)
        schema = schema or next((value for key, value in query if key == "schema"), None)
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema must be a plain identifier, not {schema!r}")
        self.dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])))
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self._pool: Any = None

    async def open(self) -> None:
        """See `JobStore.open`; creates the pool, the schema if named, and applies migrations."""
        if self._pool is not None:
            return
        settings = {"search_path": self.schema} if self.schema else None
        with _translated("connect"):
            pool = await asyncpg.create_pool(
                self.dsn, min_size=self.min_size, max_size=self.max_size, server_settings=settings
            )
        try:
            with _translated("migration"):
                await self._migrate(pool)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def _migrate(self, pool: Any) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if self.schema:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(migrations.VERSION_TABLE_POSTGRES)
            have = {row[0] for row in await conn.fetch("SELECT version FROM casola_schema_version")}
            if have and max(have) > migrations.latest():
                raise StoreError(f"the job store's schema is version {max(have)}, newer than this casola knows")
            for version, (name, statements) in sorted(migrations.POSTGRES.items()):
                if version in have:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO casola_schema_version (version, name) VALUES ($1, $2)", version, name)

    async def close(self) -> None:
        """See `JobStore.close`; waits for the connections in use to be released."""
        pool, self._pool = self._pool, None
        if pool is not None:
            with _translated("close"):
                await pool.close()

    @property
    def pool(self) -> Any:
        """The asyncpg pool.

        Raises:
            StoreError: the store is not open.
        """
        if self._pool is None:
            raise StoreError("the postgresql job store is not open")
        return self._pool

    async def submit(self, job: NewJob, now: float, *, lease_owner: str = "", lease_s: float = 0.0) -> tuple[Job, bool]:
        """See `JobStore.submit`."""
        record = new_job(job, uuid.uuid4().hex, now, lease_owner=lease_owner, lease_s=lease_s)
        row = job_to_row(record)[:-1]  # the INSERT computes vtag
        pool = self.pool
        with _translated("submit"):
            if not record.idempotency_key:
                vtag = await pool.fetchval(_INSERT_ONE, *row)
                return msgspec.structs.replace(record, vtag=vtag), True
            for _ in range(_SUBMIT_TRIES):
                if (vtag := await pool.fetchval(_INSERT_ONCE, *row)) is not None:
                    return msgspec.structs.replace(record, vtag=vtag), True
                existing = await pool.fetchrow(_BY_KEY, record.tenant, record.idempotency_key)
                if existing is not None:
                    return job_from_row(existing), False
        raise StoreError("postgresql submit failed: the idempotency key kept conflicting")

    async def get(self, job_id: str, tenant: str | None) -> Job | None:
        """See `JobStore.get`."""
        return await self._one("get", _GET, job_id, tenant)

    async def claim(self, models: Sequence[str], owner: str, lease_s: float, now: float) -> Job | None:
        """See `JobStore.claim`."""
        names = check_models(models)
        if not names:
            return None
        sql, arg = _claim_sql(_CLAIMS, names)
        return await self._one("claim", sql, arg, owner, now + lease_s, now)

    async def claim_many(self, models: Sequence[str], owner: str, lease_s: float, now: float, limit: int) -> list[Job]:
        """See `JobStore.claim_many`: one statement."""
        names = check_models(models)
        if not names or limit <= 0:
            return []
        sql, arg = _claim_sql(_CLAIMS_MANY, names)
        pool = self.pool
        with _translated("claim"):
            rows = await pool.fetch(sql, arg, owner, now + lease_s, now, limit)
        rows = sorted(rows, key=lambda r: (-r["priority"], r["vtag"], r["created_at"], r["seq"]))  # RETURNING: no order
        return [job_from_row(r) for r in rows]

    async def renew(self, job_id: str, fence: int, lease_s: float, now: float, progress: float | None = None) -> bool:
        """See `JobStore.renew`."""
        return await self._update("renew", _RENEW, job_id, fence, now + lease_s, progress)

    async def renew_many(self, items: Sequence[tuple[str, int]], lease_s: float, now: float) -> list[str]:
        """See `JobStore.renew_many`."""
        if not items:
            return []
        ids = [job_id for job_id, _ in items]
        fences = [fence for _, fence in items]
        pool = self.pool
        with _translated("renew_many"):
            rows = await pool.fetch(_RENEW_MANY, ids, fences, now + lease_s)
        renewed = {(row[0], row[1]) for row in rows}
        return [job_id for job_id, fence in items if (job_id, fence) not in renewed]

    async def checkpoint(
        self, job_id: str, fence: int, seq: int, data: bytes, now: float, lease_s: float, progress: float | None = None
    ) -> bool:
        """See `JobStore.checkpoint`."""
        return await self._update("checkpoint", _CHECKPOINT, job_id, fence, now + lease_s, seq, data, progress)

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
        """See `JobStore.complete`."""
        args = (job_id, fence, now, result, content_type, error_type, error, inference_ms)
        return await self._update("complete", _COMPLETE, *args)

    async def requeue_expired(self, now: float) -> list[Job]:
        """See `JobStore.requeue_expired`."""
        return await self._many("requeue_expired", _EXPIRED, now, CANCELLED, WORKER_ERROR)

    async def release_owner(self, owner_prefix: str, now: float) -> list[Job]:
        """See `JobStore.release_owner`."""
        if not owner_prefix:
            raise ValueError("release_owner needs a non-empty owner prefix")
        return await self._many("release_owner", _OWNED_BY, now, CANCELLED, WORKER_ERROR, owner_prefix)

    async def release(self, job_id: str, fence: int, now: float) -> bool:
        """See `JobStore.release`."""
        return bool(await self._many("release", _RELEASE, now, CANCELLED, WORKER_ERROR, job_id, fence))

    async def cancel(self, job_id: str, tenant: str | None, now: float, *, force: bool = False) -> Job | None:
        """See `JobStore.cancel`."""
        job = await self._one("cancel", _CANCEL, job_id, tenant, now, force, CANCELLED)
        return job if job is not None else await self.get(job_id, tenant)

    async def due_webhooks(self, now: float, limit: int, hold_s: float = 30.0) -> list[Job]:
        """See `JobStore.due_webhooks`."""
        if limit <= 0:
            return []
        return await self._many("due_webhooks", _DUE_WEBHOOKS, now, limit, now + hold_s)

    async def webhook_attempted(self, job_id: str, delivered: bool, now: float, next_at: float | None) -> bool:
        """See `JobStore.webhook_attempted`."""
        done = delivered or next_at is None
        return await self._update("webhook_attempted", _WEBHOOK_ATTEMPTED, job_id, done, None if done else next_at)

    async def queue_position(self, job_id: str) -> int | None:
        """See `JobStore.queue_position`."""
        pool = self.pool
        with _translated("queue_position"):
            row = await pool.fetchrow(_POSITION, job_id)
        return None if row is None else int(row[0])

    async def purge(self, now: float, retention_s: float) -> int:
        """See `JobStore.purge`."""
        pool = self.pool
        with _translated("purge"):
            return _changed(await pool.execute(_PURGE, now - retention_s))

    async def counts(self) -> dict[str, int]:
        """See `JobStore.counts`."""
        pool = self.pool
        with _translated("counts"):
            rows = await pool.fetch("SELECT status, COUNT(*) FROM casola_jobs GROUP BY status")
        counts = dict.fromkeys((status.value for status in JobStatus), 0)
        counts.update((row[0], int(row[1])) for row in rows)
        return counts

    async def queued_by_model(self) -> dict[str, int]:
        """See `JobStore.queued_by_model`."""
        pool = self.pool
        with _translated("queued_by_model"):
            rows = await pool.fetch(_QUEUED_BY_MODEL)
        return {row[0]: int(row[1]) for row in rows}

    async def record_audit(self, records: Sequence[AuditRecord]) -> None:
        """See `JobStore.record_audit`: one executemany, in one transaction."""
        if not records:
            return
        rows = [msgspec.structs.astuple(record) for record in records]
        pool = self.pool
        with _translated("record_audit"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.executemany(_INSERT_AUDIT, rows)

    async def audits(self, *, tenant: str | None = None, since: float = 0.0, limit: int = 100) -> list[AuditRecord]:
        """See `JobStore.audits`."""
        if limit <= 0:
            return []
        pool = self.pool
        with _translated("audits"):
            if tenant is None:
                rows = await pool.fetch(_AUDITS, since, limit)
            else:
                rows = await pool.fetch(_AUDITS_OF, since, limit, tenant)
        return [audit_from_row(row) for row in rows]

    async def _one(self, what: str, sql: str, *args: Any) -> Job | None:
        pool = self.pool
        with _translated(what):
            row = await pool.fetchrow(sql, *args)
        return None if row is None else job_from_row(row)

    async def _many(self, what: str, sql: str, *args: Any) -> list[Job]:
        pool = self.pool
        with _translated(what):
            rows = await pool.fetch(sql, *args)
        return [job_from_row(row) for row in rows]

    async def _update(self, what: str, sql: str, *args: Any) -> bool:
        pool = self.pool
        with _translated(what):
            return _changed(await pool.execute(sql, *args)) == 1
