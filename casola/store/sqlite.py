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
from typing import Any, Final, NamedTuple, TypeVar, cast

from casola.store import migrations
from casola.store.base import (
    CANCELLED,
    JOB_COLUMNS,
    WORKER_ERROR,
    Job,
    JobStatus,
    JobStore,
    NewJob,
    StoreError,
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

_COLS: Final = ", ".join(JOB_COLUMNS)
_INSERT: Final = f"INSERT INTO casola_jobs ({_COLS}) VALUES ({', '.join('?' * len(JOB_COLUMNS))})"
_SELECT: Final = f"SELECT {_COLS} FROM casola_jobs"
_RUNNING_UNDER_FENCE: Final = "id = :id AND fence = :fence AND status = 'IN_PROGRESS'"
_CLAIM: Final = (
    "UPDATE casola_jobs SET status = 'IN_PROGRESS', attempt = attempt + 1, fence = fence + 1,"
    " lease_owner = ?, lease_expires = ?, started_at = COALESCE(started_at, ?)"
    " WHERE id = (SELECT id FROM casola_jobs WHERE status = 'IN_QUEUE' AND model IN ({marks})"
    f" ORDER BY priority DESC, created_at, seq LIMIT 1) RETURNING {_COLS}"
)
_RENEW: Final = (
    "UPDATE casola_jobs SET lease_expires = :expires, progress = COALESCE(:progress, progress)"
    f" WHERE {_RUNNING_UNDER_FENCE}"
)
_CHECKPOINT: Final = (
    "UPDATE casola_jobs SET lease_expires = :expires,"
    " checkpoint = CASE WHEN :seq > checkpoint_seq THEN :data ELSE checkpoint END,"
    f" checkpoint_seq = MAX(checkpoint_seq, :seq) WHERE {_RUNNING_UNDER_FENCE}"
)
_COMPLETE: Final = (
    "UPDATE casola_jobs SET status = 'COMPLETED', completed_at = :now, lease_expires = NULL,"
    " result = :result, result_content_type = :content_type, error_type = :error_type, error = :error"
    f" WHERE {_RUNNING_UNDER_FENCE}"
)
# Taking a lease back: {where} picks the leases (expired ones, or one by id and fence).
_ENDS: Final = "(attempt >= max_attempts OR cancel_requested)"
_TAKE_BACK: Final = (
    f"UPDATE casola_jobs SET status = CASE WHEN {_ENDS} THEN 'COMPLETED' ELSE 'IN_QUEUE' END,"
    f" completed_at = CASE WHEN {_ENDS} THEN :now END,"
    f" lease_owner = CASE WHEN {_ENDS} THEN lease_owner ELSE '' END, lease_expires = NULL,"
    " error_type = CASE WHEN cancel_requested THEN :cancelled WHEN attempt >= max_attempts THEN :worker_error"
    " ELSE error_type END,"
    " error = CASE WHEN cancel_requested THEN 'cancelled by request' WHEN attempt >= max_attempts"
    " THEN 'gave up after ' || attempt || ' attempts: the worker died, hung or lost its connection'"
    f" ELSE error END WHERE {{where}} RETURNING {_COLS}"
)
_EXPIRED: Final = "status = 'IN_PROGRESS' AND lease_expires <= :now"
_STOPS: Final = "(status = 'IN_QUEUE' OR :force)"  # cancel: completes at once rather than asking
_CANCEL: Final = (
    "UPDATE casola_jobs SET cancel_requested = 1,"
    f" status = CASE WHEN {_STOPS} THEN 'COMPLETED' ELSE status END,"
    f" completed_at = CASE WHEN {_STOPS} THEN :now ELSE completed_at END,"
    f" lease_expires = CASE WHEN {_STOPS} THEN NULL ELSE lease_expires END,"
    f" error_type = CASE WHEN {_STOPS} THEN :cancelled ELSE error_type END,"
    f" error = CASE WHEN {_STOPS} THEN 'cancelled by request' ELSE error END"
    f" WHERE id = :id AND status <> 'COMPLETED' AND (:tenant IS NULL OR tenant = :tenant) RETURNING {_COLS}"
)
_POSITION: Final = (
    "SELECT (SELECT COUNT(*) FROM casola_jobs q WHERE q.status = 'IN_QUEUE' AND q.model = j.model"
    " AND (q.priority > j.priority OR (q.priority = j.priority"
    " AND (q.created_at < j.created_at OR (q.created_at = j.created_at AND q.seq < j.seq)))))"
    " FROM casola_jobs j WHERE j.id = ? AND j.status = 'IN_QUEUE'"
)


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

    async def submit(self, job: NewJob, now: float) -> tuple[Job, bool]:
        """See `JobStore.submit`."""
        record = new_job(job, uuid.uuid4().hex, now)
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

    async def renew(self, job_id: str, fence: int, lease_s: float, now: float, progress: float | None = None) -> bool:
        """See `JobStore.renew`."""
        args = {"id": job_id, "fence": fence, "expires": now + lease_s, "progress": progress}
        return await self._call(_changed, _RENEW, args)

    async def checkpoint(self, job_id: str, fence: int, seq: int, data: bytes, now: float, lease_s: float) -> bool:
        """See `JobStore.checkpoint`."""
        args = {"id": job_id, "fence": fence, "expires": now + lease_s, "seq": seq, "data": data}
        return await self._call(_changed, _CHECKPOINT, args)

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
    ) -> bool:
        """See `JobStore.complete`."""
        args = {"id": job_id, "fence": fence, "now": now, "result": result, "content_type": content_type}
        args.update(error_type=error_type, error=error)
        return await self._call(_changed, _COMPLETE, args)

    async def requeue_expired(self, now: float) -> list[Job]:
        """See `JobStore.requeue_expired`."""
        return await self._call(_take_back, _EXPIRED, {"now": now})

    async def release(self, job_id: str, fence: int, now: float) -> bool:
        """See `JobStore.release`."""
        args = {"now": now, "id": job_id, "fence": fence}
        return bool(await self._call(_take_back, _RUNNING_UNDER_FENCE, args))

    async def cancel(self, job_id: str, tenant: str | None, now: float, *, force: bool = False) -> Job | None:
        """See `JobStore.cancel`."""
        args = {"id": job_id, "tenant": tenant, "now": now, "force": force, "cancelled": CANCELLED}
        return await self._call(_cancel, args)

    async def queue_position(self, job_id: str) -> int | None:
        """See `JobStore.queue_position`."""
        return await self._call(_position, job_id)

    async def purge(self, now: float, retention_s: float) -> int:
        """See `JobStore.purge`."""
        return await self._call(_purge, now - retention_s)

    async def counts(self) -> dict[str, int]:
        """See `JobStore.counts`."""
        return await self._call(_counts)


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
        StoreError: SQLite failed, or the file's schema is newer than this code.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None)  # autocommit: transactions are explicit
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


def _one(conn: sqlite3.Connection, sql: str, args: Any) -> Job | None:
    rows = conn.execute(sql, args).fetchall()  # fetchall: RETURNING finishes its statement
    return job_from_row(rows[0]) if rows else None


def _submit(conn: sqlite3.Connection, job: Job, row: tuple[Any, ...]) -> tuple[Job, bool]:
    if job.idempotency_key:
        sql = f"{_SELECT} WHERE tenant = ? AND idempotency_key = ?"
        existing = _one(conn, sql, (job.tenant, job.idempotency_key))
        if existing is not None:
            return existing, False
    conn.execute(_INSERT, row)
    return job, True


def _get(conn: sqlite3.Connection, job_id: str, tenant: str | None) -> Job | None:
    if tenant is None:
        return _one(conn, f"{_SELECT} WHERE id = ?", (job_id,))
    return _one(conn, f"{_SELECT} WHERE id = ? AND tenant = ?", (job_id, tenant))


def _claim(conn: sqlite3.Connection, models: list[str], owner: str, expires: float, now: float) -> Job | None:
    sql = _CLAIM.format(marks=", ".join("?" * len(models)))
    return _one(conn, sql, (owner, expires, now, *models))


def _changed(conn: sqlite3.Connection, sql: str, args: dict[str, Any]) -> bool:
    return conn.execute(sql, args).rowcount == 1


def _take_back(conn: sqlite3.Connection, where: str, args: dict[str, Any]) -> list[Job]:
    args = {**args, "cancelled": CANCELLED, "worker_error": WORKER_ERROR}
    return [job_from_row(row) for row in conn.execute(_TAKE_BACK.format(where=where), args).fetchall()]


def _cancel(conn: sqlite3.Connection, args: dict[str, Any]) -> Job | None:
    job = _one(conn, _CANCEL, args)
    return job if job is not None else _get(conn, args["id"], args["tenant"])


def _position(conn: sqlite3.Connection, job_id: str) -> int | None:
    row = conn.execute(_POSITION, (job_id,)).fetchone()
    return None if row is None else int(row[0])


def _purge(conn: sqlite3.Connection, before: float) -> int:
    cur = conn.execute("DELETE FROM casola_jobs WHERE status = 'COMPLETED' AND completed_at < ?", (before,))
    return cur.rowcount


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys((status.value for status in JobStatus), 0)
    for status, n in conn.execute("SELECT status, COUNT(*) FROM casola_jobs GROUP BY status"):
        counts[status] = n
    return counts
