"""What only the PostgreSQL store promises: several queue nodes share it without stepping on each other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from casola.store import JobStatus, JobStore, NewJob, StoreError, open_store
from casola.store.postgres import PostgresJobStore
from tests.store.conftest import PG_DSN, Backend

__all__: list[str] = []

pg_only = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def new(**kw: object) -> NewJob:
    return NewJob(tenant="t", model="m", payload=b"p", **kw)  # type: ignore[arg-type]


@pg_only
@pytest.mark.asyncio
async def test_two_nodes_sweeping_at_once_take_each_lease_back_once(backend: Backend) -> None:
    one, two = await backend.make(), await backend.make()
    for i in range(40):
        await one.submit(new(), float(i))
    while await one.claim(["m"], "w", 10.0, 100.0) is not None:
        pass
    swept = await asyncio.gather(*(node.requeue_expired(200.0) for node in (one, two, one, two)))
    ids = [job.id for jobs in swept for job in jobs]
    assert len(ids) == len(set(ids)) == 40
    assert await two.counts() == {"IN_QUEUE": 40, "IN_PROGRESS": 0, "COMPLETED": 0}


@pg_only
@pytest.mark.asyncio
async def test_two_nodes_submitting_one_idempotency_key_create_one_job(backend: Backend) -> None:
    nodes = [await backend.make(), await backend.make()]
    results = await asyncio.gather(*(nodes[i % 2].submit(new(idempotency_key="same"), float(i)) for i in range(20)))
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1


@pg_only
@pytest.mark.asyncio
async def test_a_cancel_racing_a_claim_ends_in_one_consistent_state(backend: Backend) -> None:
    one, two = await backend.make(), await backend.make()
    jobs = [(await one.submit(new(), float(i)))[0] for i in range(30)]

    async def claim_all(store: JobStore) -> None:
        while await store.claim(["m"], "w", 10.0, 100.0) is not None:
            pass

    await asyncio.gather(claim_all(one), *(two.cancel(job.id, "t", 100.0) for job in jobs))
    for job in jobs:
        got = await one.get(job.id, None)
        assert got is not None and got.cancel_requested
        # either cancelled while queued, or claimed first and then asked to cancel
        assert (got.status, got.attempt) in ((JobStatus.COMPLETED, 0), (JobStatus.RUNNING, 1))


@pg_only
@pytest.mark.asyncio
async def test_schemas_keep_stores_apart(backend: Backend, tmp_path: Path) -> None:
    mine = await backend.make()
    job, _ = await mine.submit(new(), 1.0)
    other = Backend("postgres", tmp_path)
    try:
        theirs = await other.make()
        assert await theirs.get(job.id, None) is None
        assert await theirs.claim(["m"], "w", 1.0, 2.0) is None
    finally:
        await other.aclose()


def test_the_url_may_name_the_schema() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:5432/test?schema=jobs_a&sslmode=disable")
    assert isinstance(store, PostgresJobStore)
    assert store.schema == "jobs_a"
    assert store.dsn == "postgresql://postgres@127.0.0.1:5432/test?sslmode=disable"
    with pytest.raises(ValueError):
        PostgresJobStore("postgresql://h/db", schema='x"; DROP TABLE casola_jobs; --')


@pytest.mark.asyncio
async def test_an_unreachable_server_raises_store_error() -> None:
    store = PostgresJobStore("postgresql://postgres@127.0.0.1:1/test", min_size=1)
    with pytest.raises(StoreError):
        await store.open()
    with pytest.raises(StoreError):
        await store.get("x", None)


@pg_only
@pytest.mark.asyncio
async def test_a_newer_schema_is_refused(backend: Backend) -> None:
    import asyncpg  # type: ignore[import-untyped]

    await backend.make()
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": backend.schema})
    try:
        await conn.execute("INSERT INTO casola_schema_version VALUES (999, 'from the future')")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer"):
        await backend.make()
