"""The embedded job store: one SQLite file, written by one dedicated thread with group commit.

Every operation, reads included, is a function queued to the writer thread, which owns the only
connection; the event loop never blocks on SQLite and awaits a future instead. The thread takes
every operation waiting in its queue (up to `MAX_BATCH`), runs them in ONE transaction, each
under a savepoint so that one failure undoes only itself, commits once, and only then resolves
their futures. With `journal_mode=WAL` and `synchronous=FULL` each commit is one fsync of the WAL,
so a submit is durable when it returns and concurrent submits share the fsync.

Concurrent claimers cannot get the same job because all writes run one at a time on the thread
(and, across processes sharing the file, under SQLite's write lock: `BEGIN IMMEDIATE`).

URLs: `sqlite:///abs/path/jobs.db` (absolute), `sqlite://rel/jobs.db` (relative), `sqlite://:memory:`.
The statements themselves live in `casola.store.sqlite_sql`.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar, cast

import msgspec

from casola.files import create_private
from casola.store import migrations
from casola.store import sqlite_sql as sql
from casola.store.base import (
    CANCELLED,
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

__all__ = ["MAX_BATCH", "SqliteJobStore"]

T = TypeVar("T")

# Operations per transaction. Enough that 64+ concurrent submitters share one fsync; small enough
# that a batch's futures resolve within a few milliseconds of CPU (PostgreSQL's WAL writer flushes
# whatever is pending in the same spirit; there is no fixed precedent for the number).
MAX_BATCH: Final = 512
# How long a writer waits for another process's write lock before the operation fails (SQLite
# default is 0; Django and Rails both settle on 5 s).
BUSY_TIMEOUT_MS: Final = 5000
_WAL_RETRY_MS: Final = 10


class _Op(NamedTuple):
    fn: Callable[..., Any]  # fn(conn, *args), run on the writer thread
    args: tuple[Any, ...]
    fut: asyncio.Future[Any]


# (future, value, ok): the value is the result if ok, else the exception to raise.
_Outcome = tuple[asyncio.Future[Any], Any, bool]


class SqliteJobStore(JobStore):
    """A `JobStore` in one SQLite file (or `:memory:`), for a single queue node."""

    def __init__(self, path: str, *, max_batch: int = MAX_BATCH) -> None:
        """Args:
        path: the database file, created if missing; ":memory:" for a private in-memory store.
        max_batch: the most operations one transaction (one fsync) carries.
        """
        self.path = path
        self.max_batch = max_batch
        self.commits = 0  # transactions committed by the writer thread, for tests and benchmarks
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """See `JobStore.open`; starts the writer thread."""
        if self._thread is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._stopped = loop.create_future()
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="casola-sqlite-store", daemon=True)
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread = None
            raise

    async def close(self) -> None:
        """See `JobStore.close`; the operations already queued still commit."""
        if self._thread is None or self._closing or self._stopped is None:
            return
        self._closing = True
        self._queue.put(None)
        try:
            await asyncio.shield(self._stopped)
        finally:
            self._thread = None
            self._closing = False

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None or self._closing or self._loop is None:
            raise StoreError("the sqlite job store is not open")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put(_Op(fn, args, fut))
        return cast(T, await fut)

    # -- the writer thread -------------------------------------------------------------------

    def _main(self, ready: asyncio.Future[None]) -> None:
        try:
            conn = _connect(self.path)
        except StoreError as exc:
            self._settle([(ready, exc, False)])
            return
        self._settle([(ready, None, True)])
        try:
            self._serve(conn)
        finally:
            conn.close()
            if self._stopped is not None:
                self._settle([(self._stopped, None, True)])

    def _serve(self, conn: sqlite3.Connection) -> None:
        """Run batches until the stop marker (None) arrives; everything queued before it runs."""
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            ops = [op for op in batch if op is not None]
            if ops:
                self._settle(self._run_batch(conn, ops))
            if len(ops) < len(batch):
                return

    def _run_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> list[_Outcome]:
        """One transaction, one commit; if the transaction itself fails, every operation fails."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [_run_one(conn, op) for op in ops]
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return [(op.fut, _store_error(exc, "commit"), False) for op in ops]
        self.commits += 1
        return outcomes

    def _settle(self, outcomes: list[_Outcome]) -> None:
        if self._loop is None:
            return
        with suppress(RuntimeError):  # the loop is closed: nobody awaits these any more
            self._loop.call_soon_threadsafe(_resolve, outcomes)

    # -- JobStore ----------------------------------------------------------------------------

    async def submit(self, job: NewJob, now: float, *, lease_owner: str = "", lease_s: float = 0.0) -> tuple[Job, bool]:
        """See `JobStore.submit`."""
        record = new_job(job, uuid.uuid4().hex, now, lease_owner=lease_owner, lease_s=lease_s)
        return await self._call(_submit, record, job_to_row(record))

    async def get(self, job_id: str, tenant: str | None) -> Job | None:
        """See `JobStore.get`."""
        return await self._call(_get, job_id, tenant)

    async def claim(self, models: Sequence[str], owner: str, lease_s: float, now: float) -> Job | None:
        """See `JobStore.claim`."""
        names = check_models(models)
        if not names:
            return None
        return await self._call(_claim, names, owner, now + lease_s, now)

    async def claim_many(self, models: Sequence[str], owner: str, lease_s: float, now: float, limit: int) -> list[Job]:
        """See `JobStore.claim_many`: one transaction on the writer thread."""
        names = check_models(models)
        if not names or limit <= 0:
            return []
        return await self._call(_claim_many, names, owner, now + lease_s, now, limit)

    async def renew(self, job_id: str, fence: int, lease_s: float, now: float, progress: float | None = None) -> bool:
        """See `JobStore.renew`."""
        args = {"id": job_id, "fence": fence, "expires": now + lease_s, "progress": progress}
        return await self._call(_changed, sql.RENEW, args)

    async def renew_many(self, items: Sequence[tuple[str, int]], lease_s: float, now: float) -> list[str]:
        """See `JobStore.renew_many`."""
        if not items:
            return []
        return await self._call(_renew_many, list(items), now + lease_s)

    async def checkpoint(
        self, job_id: str, fence: int, seq: int, data: bytes, now: float, lease_s: float, progress: float | None = None
    ) -> bool:
        """See `JobStore.checkpoint`."""
        args = {"id": job_id, "fence": fence, "expires": now + lease_s, "seq": seq, "data": data, "progress": progress}
        return await self._call(_changed, sql.CHECKPOINT, args)

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
        args = {"id": job_id, "fence": fence, "now": now, "result": result, "content_type": content_type}
        args.update(error_type=error_type, error=error, inference_ms=inference_ms)
        return await self._call(_changed, sql.COMPLETE, args)

    async def requeue_expired(self, now: float) -> list[Job]:
        """See `JobStore.requeue_expired`."""
        return await self._call(_take_back, sql.EXPIRED, {"now": now})

    async def release_owner(self, owner_prefix: str, now: float) -> list[Job]:
        """See `JobStore.release_owner`."""
        if not owner_prefix:
            raise ValueError("release_owner needs a non-empty owner prefix")
        return await self._call(_take_back, sql.OWNED_BY, {"now": now, "prefix": owner_prefix})

    async def release(self, job_id: str, fence: int, now: float) -> bool:
        """See `JobStore.release`."""
        args = {"now": now, "id": job_id, "fence": fence}
        return bool(await self._call(_take_back, sql.RUNNING_UNDER_FENCE, args))

    async def cancel(self, job_id: str, tenant: str | None, now: float, *, force: bool = False) -> Job | None:
        """See `JobStore.cancel`."""
        args = {"id": job_id, "tenant": tenant, "now": now, "force": force, "cancelled": CANCELLED}
        return await self._call(_cancel, args)

    async def due_webhooks(self, now: float, limit: int, hold_s: float = 30.0) -> list[Job]:
        """See `JobStore.due_webhooks`."""
        if limit <= 0:
            return []
        return await self._call(_due_webhooks, now, limit, now + hold_s)

    async def webhook_attempted(self, job_id: str, delivered: bool, now: float, next_at: float | None) -> bool:
        """See `JobStore.webhook_attempted`."""
        done = delivered or next_at is None
        args = {"id": job_id, "done": done, "next": None if done else next_at}
        return await self._call(_changed, sql.WEBHOOK_ATTEMPTED, args)

    async def queue_position(self, job_id: str) -> int | None:
        """See `JobStore.queue_position`."""
        return await self._call(_position, job_id)

    async def purge(self, now: float, retention_s: float) -> int:
        """See `JobStore.purge`."""
        return await self._call(_purge, now - retention_s)

    async def counts(self) -> dict[str, int]:
        """See `JobStore.counts`."""
        return await self._call(_counts)

    async def queued_by_model(self) -> dict[str, int]:
        """See `JobStore.queued_by_model`."""
        return await self._call(_queued_by_model)

    async def record_audit(self, records: Sequence[AuditRecord]) -> None:
        """See `JobStore.record_audit`: one operation on the writer thread."""
        if records:
            await self._call(_record_audit, [msgspec.structs.astuple(record) for record in records])

    async def audits(self, *, tenant: str | None = None, since: float = 0.0, limit: int = 100) -> list[AuditRecord]:
        """See `JobStore.audits`."""
        if limit <= 0:
            return []
        if tenant is None:
            return await self._call(_audits, sql.AUDITS, (since, limit))
        return await self._call(_audits, sql.AUDITS_OF, (tenant, since, limit))


# -- helpers run by the writer thread (conn first) -----------------------------------------------


def _run_one(conn: sqlite3.Connection, op: _Op) -> _Outcome:
    """Run one operation under a savepoint; its failure undoes only its own changes."""
    conn.execute("SAVEPOINT op")
    try:
        value = op.fn(conn, *op.args)
    except Exception as exc:  # handed to the caller's future, not swallowed
        conn.execute("ROLLBACK TO op")  # raises (failing the batch) if SQLite already rolled back
        conn.execute("RELEASE op")
        return (op.fut, _store_error(exc, "operation") if isinstance(exc, sqlite3.Error) else exc, False)
    conn.execute("RELEASE op")
    return (op.fut, value, True)


def _resolve(outcomes: list[_Outcome]) -> None:
    for fut, value, ok in outcomes:
        if fut.done():  # the caller was cancelled; the operation took effect regardless
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _store_error(exc: BaseException, what: str) -> StoreError:
    err = StoreError(f"sqlite {what} failed: {exc}")
    err.__cause__ = exc
    return err


def _connect(path: str) -> sqlite3.Connection:
    """Open, configure and migrate the database.

    Raises:
        StoreError: the file cannot be created, SQLite failed, or the file's schema is newer than this code.
    """
    try:
        if path != ":memory:":
            # SQLite creates the file (and its -wal and -shm files, with the file's mode) as the umask
            # allows, 0644 commonly: job inputs and results are the tenants', so it is 0600 like the keys.
            create_private(Path(path))
        conn = sqlite3.connect(path, isolation_level=None)  # autocommit: transactions are explicit
    except OSError as exc:
        raise StoreError(f"sqlite cannot create {path!r}: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite cannot open {path!r}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enter_wal(conn)
        conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit: durable on return
        _migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"sqlite cannot migrate {path!r}: {exc}") from exc
    except StoreError:
        conn.close()
        raise
    return conn


def _enter_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL ("memory" for :memory:, which is fine).

    The switch needs the file to itself and SQLite answers "database is locked" without waiting
    for the busy timeout while another connection opens it at the same time, so it retries.

    Raises:
        sqlite3.Error: SQLite failed, or the file stayed locked for BUSY_TIMEOUT_MS.
    """
    for _ in range(BUSY_TIMEOUT_MS // _WAL_RETRY_MS):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise
        time.sleep(_WAL_RETRY_MS / 1000)
    conn.execute("PRAGMA journal_mode = WAL")


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the missing migrations in one write transaction (other processes wait for it).

    Raises:
        StoreError: the file's schema is newer than this code.
        sqlite3.Error: SQLite failed; nothing was applied.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(migrations.VERSION_TABLE_SQLITE)
        have = {row[0] for row in conn.execute("SELECT version FROM casola_schema_version")}
        if have and max(have) > migrations.latest():
            raise StoreError(f"the job store's schema is version {max(have)}, newer than this casola knows")
        for version, (name, statements) in sorted(migrations.SQLITE.items()):
            if version in have:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO casola_schema_version (version, name) VALUES (?, ?)", (version, name))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _one(conn: sqlite3.Connection, statement: str, args: Any) -> Job | None:
    rows = conn.execute(statement, args).fetchall()  # fetchall: RETURNING finishes its statement
    return job_from_row(rows[0]) if rows else None


def _submit(conn: sqlite3.Connection, job: Job, row: tuple[Any, ...]) -> tuple[Job, bool]:
    """Insert the job, its vtag computed by the INSERT (the writer lock makes the tag exact)."""
    if job.idempotency_key:
        existing = _one(conn, sql.BY_KEY, (job.tenant, job.idempotency_key))
        if existing is not None:
            return existing, False
    rows = conn.execute(sql.INSERT, row[:-1]).fetchall()  # fetchall: RETURNING finishes its statement
    return msgspec.structs.replace(job, vtag=rows[0][0]), True


def _get(conn: sqlite3.Connection, job_id: str, tenant: str | None) -> Job | None:
    if tenant is None:
        return _one(conn, sql.BY_ID, (job_id,))
    return _one(conn, sql.BY_ID_AND_TENANT, (job_id, tenant))


def _claim(conn: sqlite3.Connection, models: list[str], owner: str, expires: float, now: float) -> Job | None:
    statement = sql.CLAIM.format(marks=", ".join("?" * len(models)))
    return _one(conn, statement, (owner, expires, now, *models))


def _claim_many(
    conn: sqlite3.Connection, models: list[str], owner: str, expires: float, now: float, n: int
) -> list[Job]:
    jobs: list[Job] = []
    while len(jobs) < n and (job := _claim(conn, models, owner, expires, now)) is not None:
        jobs.append(job)
    return jobs


def _changed(conn: sqlite3.Connection, statement: str, args: dict[str, Any]) -> bool:
    return conn.execute(statement, args).rowcount == 1


def _renew_many(conn: sqlite3.Connection, items: list[tuple[str, int]], expires: float) -> list[str]:
    """Renew each lease in turn; all of them commit in the batch's one transaction."""
    refused = []
    for job_id, fence in items:
        args = {"id": job_id, "fence": fence, "expires": expires, "progress": None}
        if not _changed(conn, sql.RENEW, args):
            refused.append(job_id)
    return refused


def _take_back(conn: sqlite3.Connection, where: str, args: dict[str, Any]) -> list[Job]:
    args = {**args, "cancelled": CANCELLED, "worker_error": WORKER_ERROR}
    return [job_from_row(row) for row in conn.execute(sql.TAKE_BACK.format(where=where), args).fetchall()]


def _cancel(conn: sqlite3.Connection, args: dict[str, Any]) -> Job | None:
    job = _one(conn, sql.CANCEL, args)
    return job if job is not None else _get(conn, args["id"], args["tenant"])


def _position(conn: sqlite3.Connection, job_id: str) -> int | None:
    row = conn.execute(sql.POSITION, (job_id,)).fetchone()
    return None if row is None else int(row[0])


def _purge(conn: sqlite3.Connection, before: float) -> int:
    conn.execute(sql.PURGE_AUDITS, (before,))
    return conn.execute(sql.PURGE, (before,)).rowcount


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys((status.value for status in JobStatus), 0)
    for status, n in conn.execute(sql.COUNTS):
        counts[status] = n
    return counts


def _queued_by_model(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute(sql.QUEUED_BY_MODEL).fetchall())


def _record_audit(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(sql.INSERT_AUDIT, rows)


def _audits(conn: sqlite3.Connection, statement: str, args: tuple[Any, ...]) -> list[AuditRecord]:
    return [audit_from_row(row) for row in conn.execute(statement, args).fetchall()]


def _due_webhooks(conn: sqlite3.Connection, now: float, limit: int, until: float) -> list[Job]:
    """Select the due ones and hold them, in one transaction (SQLite's write lock covers both)."""
    jobs = [job_from_row(row) for row in conn.execute(sql.DUE_WEBHOOKS, (now, limit)).fetchall()]
    conn.executemany(sql.HOLD_WEBHOOK, [(until, job.id) for job in jobs])
    return [msgspec.structs.replace(job, webhook_next=until) for job in jobs]
