"""What only the SQLite store promises: durability on return, group commit, one writer thread."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from casola.store import JobStatus, NewJob, StoreError, open_store
from casola.store.sqlite import SqliteJobStore

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]


def new(payload: bytes = b"p", **kw: object) -> NewJob:
    return NewJob(tenant="t", model="m", payload=payload, **kw)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_submitted_job_survives_close_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.db")
    store = SqliteJobStore(path)
    await store.open()
    job, _ = await store.submit(new(b"\x00durable\xff", params={"k": 1}), 5.0)
    await store.close()
    reopened = SqliteJobStore(path)
    await reopened.open()
    try:
        assert await reopened.get(job.id, "t") == job
    finally:
        await reopened.close()


def test_a_submit_is_durable_when_it_returns_even_if_the_process_dies(tmp_path: Path) -> None:
    """The child submits, prints the id, and exits at once: no close, no flush, no atexit."""
    path = tmp_path / "jobs.db"
    child = (
        "import asyncio, os, sys\n"
        "from casola.store import NewJob\n"
        "from casola.store.sqlite import SqliteJobStore\n"
        "async def main():\n"
        f"    store = SqliteJobStore({str(path)!r})\n"
        "    await store.open()\n"
        "    job, _ = await store.submit(NewJob(tenant='t', model='m', payload=b'x' * 1000), 1.0)\n"
        "    sys.stdout.write(job.id); sys.stdout.flush()\n"
        "    os._exit(0)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert len(out.stdout) == 32, out.stderr
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT id, status, length(payload) FROM casola_jobs").fetchall()
    assert rows == [(out.stdout, "IN_QUEUE", 1000)]


@pytest.mark.asyncio
async def test_concurrent_submits_share_commits(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "jobs.db"))
    await store.open()
    try:
        before = store.commits
        jobs = await asyncio.gather(*(store.submit(new(b"%d" % i), float(i)) for i in range(64)))
        commits = store.commits - before
        assert commits <= 16, f"64 concurrent submits took {commits} commits: no group commit"
        assert (await store.counts())["IN_QUEUE"] == 64
        assert len({job.id for job, _ in jobs}) == 64
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_failing_operation_does_not_undo_its_batch(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "jobs.db"))
    await store.open()

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE casola_jobs SET progress = 0.5")  # a write, then a failure: both undone
        conn.execute("INSERT INTO casola_jobs (id) VALUES ('half a row')")  # NOT NULL columns: fails

    try:
        results = await asyncio.gather(
            store.submit(new(b"a"), 1.0),
            store._call(bad),
            store.submit(new(b"b"), 2.0),
            return_exceptions=True,
        )
        assert isinstance(results[1], StoreError) and isinstance(results[1].__cause__, sqlite3.IntegrityError)
        for result in (results[0], results[2]):
            assert not isinstance(result, BaseException)
            assert await store.get(result[0].id, None) == result[0]  # progress 0.0: the UPDATE was undone
        assert (await store.counts())["IN_QUEUE"] == 2
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_the_file_is_in_wal_mode_and_commits_are_synchronous_full(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "jobs.db"))
    await store.open()
    try:
        mode = await store._call(lambda conn: conn.execute("PRAGMA journal_mode").fetchone()[0])
        sync = await store._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        assert (mode, sync) == ("wal", 2)  # 2 = FULL
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_cancelled_callers_do_not_break_the_writer(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path / "jobs.db"))
    await store.open()
    try:
        tasks = [asyncio.ensure_future(store.submit(new(), float(i))) for i in range(20)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        job, _ = await store.submit(new(), 99.0)  # the writer still serves
        assert await store.get(job.id, None) == job
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_open_store_reads_sqlite_urls(tmp_path: Path) -> None:
    store = open_store(f"sqlite://{tmp_path}/jobs.db")  # tmp_path is absolute: sqlite:///...
    assert isinstance(store, SqliteJobStore) and store.path == f"{tmp_path}/jobs.db"
    memory = open_store("sqlite://:memory:")
    assert isinstance(memory, SqliteJobStore) and memory.path == ":memory:"
    await memory.open()
    try:
        job, _ = await memory.submit(new(), 1.0)
        got = await memory.get(job.id, None)
        assert got is not None and got.status is JobStatus.QUEUED
    finally:
        await memory.close()
    for bad in ("sqlite://", "mysql://x/y", "jobs.db"):
        with pytest.raises(ValueError):
            open_store(bad)


@pytest.mark.asyncio
async def test_open_fails_with_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await SqliteJobStore(str(tmp_path / "no" / "such" / "dir" / "jobs.db")).open()
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE casola_schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        conn.execute("INSERT INTO casola_schema_version VALUES (999, 'from the future')")
    store = SqliteJobStore(str(path))
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    with pytest.raises(StoreError):
        await store.get("x", None)


@pytest.mark.asyncio
async def test_the_database_and_its_journal_files_are_created_private(tmp_path: Path) -> None:
    """Job inputs and results are the tenants': jobs.db, -wal and -shm are 0600 whatever the umask
    would have let SQLite give them; a file that already exists keeps its mode."""
    path = tmp_path / "jobs.db"
    old = os.umask(0o022)  # the common default, under which SQLite alone creates 0644 files
    try:
        store = SqliteJobStore(str(path))
        await store.open()
        try:
            await store.submit(new(), 1.0)
            names = ("jobs.db", "jobs.db-wal", "jobs.db-shm")
            assert {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in names} == dict.fromkeys(names, 0o600)
        finally:
            await store.close()
        shared = tmp_path / "shared.db"
        shared.touch(0o640)  # the operator's choice
        other = SqliteJobStore(str(shared))
        await other.open()
        await other.close()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    finally:
        os.umask(old)
