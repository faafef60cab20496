"""Tenant-fair claim order (start-time fair queuing with virtual tags), run against every backend.

`submit` tags each job per model: 1 + max(the tenant's highest tag queued, the model's lowest tag
queued - 1). Claims take priority DESC, then vtag, then created_at, then submission order. Also the
queue-depth signal (`queued_by_model`) and migration 3 on a version 2 store. Times are passed in.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from casola.store import Job, JobStatus, JobStore, NewJob, migrations
from tests.store.conftest import PG_DSN, Backend

__all__: list[str] = []

LEASE = 30.0


def new(tenant: str, model: str = "m", **kw: Any) -> NewJob:
    return NewJob(tenant=tenant, model=model, payload=b"p", **kw)


async def submit_many(store: JobStore, tenant: str, n: int, start: float, **kw: Any) -> list[Job]:
    """`n` jobs of `tenant`, created at start, start + 1, ..."""
    return [(await store.submit(new(tenant, **kw), start + i))[0] for i in range(n)]


async def get(store: JobStore, job_id: str) -> Job:
    job = await store.get(job_id, None)
    assert job is not None
    return job


@pytest.mark.asyncio
async def test_a_flooding_tenant_and_a_later_one_take_turns(store: JobStore) -> None:
    a = await submit_many(store, "A", 50, 1.0)
    b = await submit_many(store, "B", 3, 100.0)
    assert [job.vtag for job in a] == list(range(1, 51))
    assert [job.vtag for job in b] == [1, 2, 3]  # B starts at the head's tag, not behind A's 50
    assert [(await get(store, job.id)).vtag for job in (a[0], a[49], b[2])] == [1, 50, 3]  # as stored
    claimed = await store.claim_many(["m"], "node/w1", LEASE, 200.0, 6)
    # equal tags: the older job first (A's were created before B's)
    assert [job.id for job in claimed] == [a[0].id, b[0].id, a[1].id, b[1].id, a[2].id, b[2].id]
    one = await store.claim(["m"], "node/w1", LEASE, 200.0)
    assert one is not None and one.id == a[3].id  # B is drained: A goes on alone


@pytest.mark.asyncio
async def test_single_claims_follow_the_same_order(store: JobStore) -> None:
    a = await submit_many(store, "A", 4, 1.0)
    b = await submit_many(store, "B", 2, 10.0)
    c = await submit_many(store, "C", 1, 20.0)
    order = []
    while (job := await store.claim(["m"], "w", LEASE, 30.0)) is not None:
        order.append(job.id)
    assert order == [a[0].id, b[0].id, c[0].id, a[1].id, b[1].id, a[2].id, a[3].id]


@pytest.mark.asyncio
async def test_a_tenant_arriving_after_claims_starts_at_the_head(store: JobStore) -> None:
    a = await submit_many(store, "A", 10, 1.0)
    assert len(await store.claim_many(["m"], "w", LEASE, 20.0, 4)) == 4  # tags 1..4 are running
    b = await submit_many(store, "B", 2, 30.0)
    assert [job.vtag for job in b] == [5, 6]  # the head's tag is 5
    more_a, _ = await store.submit(new("A"), 31.0)
    assert more_a.vtag == 11  # a tenant's own backlog keeps growing from its highest tag
    claimed = await store.claim_many(["m"], "w", LEASE, 40.0, 4)
    assert [job.id for job in claimed] == [a[4].id, b[0].id, a[5].id, b[1].id]


@pytest.mark.asyncio
async def test_tags_are_per_model(store: JobStore) -> None:
    await submit_many(store, "A", 5, 1.0, model="m")
    other, _ = await store.submit(new("A", model="n"), 10.0)
    assert other.vtag == 1
    got = await store.claim_many(["m", "n"], "w", LEASE, 20.0, 2)
    assert {job.model for job in got} == {"m", "n"}  # each model's first job carries tag 1


@pytest.mark.asyncio
async def test_a_released_job_keeps_its_tag_and_goes_before_later_tags(store: JobStore) -> None:
    a = await submit_many(store, "A", 5, 1.0)
    running = await store.claim_many(["m"], "w", LEASE, 10.0, 3)  # A's tags 1..3
    c, _ = await store.submit(new("C"), 11.0)
    assert c.vtag == 4  # the head (A's 4th job) has tag 4
    second = running[1]
    assert second.id == a[1].id and second.vtag == 2
    assert await store.release(second.id, second.fence, 12.0)
    back = await get(store, second.id)
    assert (back.status, back.vtag) == (JobStatus.QUEUED, 2)
    order = [job.id for job in await store.claim_many(["m"], "w", LEASE, 13.0, 10)]
    assert order == [a[1].id, a[3].id, c.id, a[4].id]


@pytest.mark.asyncio
async def test_requeued_and_owner_released_jobs_keep_their_tags(store: JobStore) -> None:
    await submit_many(store, "A", 3, 1.0)
    first = await store.claim(["m"], "node-a/w1", LEASE, 10.0)
    second = await store.claim(["m"], "node-b/w1", 5.0, 10.0)
    assert first is not None and second is not None
    expired = await store.requeue_expired(20.0)
    assert [(job.id, job.status, job.vtag) for job in expired] == [(second.id, JobStatus.QUEUED, 2)]
    released = await store.release_owner("node-a/", 21.0)
    assert [(job.id, job.status, job.vtag) for job in released] == [(first.id, JobStatus.QUEUED, 1)]
    order = [job.vtag for job in await store.claim_many(["m"], "w", LEASE, 22.0, 10)]
    assert order == [1, 2, 3]


@pytest.mark.asyncio
async def test_priority_still_wins_over_the_tag(store: JobStore) -> None:
    a = await submit_many(store, "A", 5, 1.0)
    urgent, _ = await store.submit(new("A", priority=5), 10.0)
    assert urgent.vtag == 6
    b, _ = await store.submit(new("B", priority=-1), 11.0)
    assert b.vtag == 1
    order = [job.id for job in await store.claim_many(["m"], "w", LEASE, 20.0, 10)]
    assert order == [urgent.id, *(job.id for job in a), b.id]


@pytest.mark.asyncio
async def test_a_job_submitted_leased_gets_a_tag_too(store: JobStore) -> None:
    await submit_many(store, "A", 3, 1.0)
    leased, _ = await store.submit(new("B"), 5.0, lease_owner="node/w1", lease_s=LEASE)
    assert leased.status is JobStatus.RUNNING and leased.vtag == 1
    assert (await get(store, leased.id)).vtag == 1
    assert await store.release(leased.id, leased.fence, 6.0)
    nxt = await store.claim(["m"], "w", LEASE, 7.0)
    assert nxt is not None and nxt.vtag == 1  # A's first job: tag 1, created earlier
    nxt = await store.claim(["m"], "w", LEASE, 7.0)
    assert nxt is not None and nxt.id == leased.id


@pytest.mark.asyncio
async def test_an_idempotent_resubmit_returns_the_stored_tag(store: JobStore) -> None:
    await submit_many(store, "A", 2, 1.0)
    first, created = await store.submit(new("A", idempotency_key="k"), 5.0)
    assert created and first.vtag == 3
    again, created = await store.submit(new("A", idempotency_key="k"), 6.0)
    assert not created and again == first


@pytest.mark.asyncio
async def test_queue_position_follows_the_fair_order(store: JobStore) -> None:
    a = await submit_many(store, "A", 3, 1.0)
    b, _ = await store.submit(new("B"), 10.0)
    assert [await store.queue_position(job.id) for job in (a[0], b, a[1], a[2])] == [0, 1, 2, 3]
    order = [job.id for job in await store.claim_many(["m"], "w", LEASE, 20.0, 10)]
    assert order == [a[0].id, b.id, a[1].id, a[2].id]


@pytest.mark.asyncio
async def test_queued_by_model_counts_only_queued_jobs(store: JobStore) -> None:
    assert await store.queued_by_model() == {}
    await submit_many(store, "A", 3, 1.0, model="m")
    await submit_many(store, "B", 2, 1.0, model="m")
    await submit_many(store, "A", 1, 1.0, model="n")
    await store.submit(new("A", model="x"), 1.0, lease_owner="w", lease_s=LEASE)  # running
    await submit_many(store, "A", 1, 1.0, model="y")
    done = await store.claim(["y"], "w", LEASE, 2.0)
    assert done is not None and await store.complete(done.id, done.fence, 3.0, result=b"r")
    assert await store.queued_by_model() == {"m": 5, "n": 1}
    assert len(await store.claim_many(["m"], "w", LEASE, 4.0, 4)) == 4
    assert await store.queued_by_model() == {"m": 1, "n": 1}


# -- migration 3 ---------------------------------------------------------------------------------

_V2_COLUMNS = (
    "id, tenant, model, status, payload, content_type, params, idempotency_key, webhook_url, priority,"
    " max_attempts, created_at, started_at, completed_at, attempt, fence, lease_owner, lease_expires,"
    " checkpoint, checkpoint_seq, progress, result, result_content_type, error_type, error, cancel_requested,"
    " inference_ms, webhook_attempts, webhook_next, webhook_done"
)
_V2_ROW: tuple[Any, ...] = ("old", "A", "m", "IN_QUEUE", b"p", "", "{}", "", "", 0, 3, 50.0, None, None, 0, 0)
_V2_ROW += ("", None, None, 0, 0.0, None, "", "", "", False, None, 0, None, False)


async def _make_version_2(backend: Backend) -> None:
    """A store as casola with schema version 2 left it, with one queued job."""
    if backend.name == "sqlite":
        with sqlite3.connect(backend.path) as conn:
            conn.execute(migrations.VERSION_TABLE_SQLITE)
            for version in (1, 2):
                name, statements = migrations.SQLITE[version]
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO casola_schema_version VALUES (?, ?)", (version, name))
            marks = ", ".join("?" * len(_V2_ROW))
            conn.execute(f"INSERT INTO casola_jobs ({_V2_COLUMNS}) VALUES ({marks})", _V2_ROW)
        return
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'CREATE SCHEMA "{backend.schema}"')
        await conn.execute(f'SET search_path TO "{backend.schema}"')
        await conn.execute(migrations.VERSION_TABLE_POSTGRES)
        for version in (1, 2):
            name, statements = migrations.POSTGRES[version]
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO casola_schema_version VALUES ($1, $2)", version, name)
        marks = ", ".join(f"${i}" for i in range(1, len(_V2_ROW) + 1))
        await conn.execute(f"INSERT INTO casola_jobs ({_V2_COLUMNS}) VALUES ({marks})", *_V2_ROW)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_migration_3_upgrades_a_version_2_store_in_place(backend: Backend) -> None:
    await _make_version_2(backend)
    store = await backend.make()
    assert [version for version, _ in await backend.versions()] == [1, 2, 3]
    old = await get(store, "old")
    assert (old.status, old.vtag, old.created_at) == (JobStatus.QUEUED, 0, 50.0)
    assert await store.queued_by_model() == {"m": 1}
    a, _ = await store.submit(new("A"), 1.0)  # created earlier, but the old job's tag 0 goes first
    b, _ = await store.submit(new("B"), 2.0)
    assert (a.vtag, b.vtag) == (1, 1)
    order = [job.id for job in await store.claim_many(["m"], "w", LEASE, 60.0, 10)]
    assert order == ["old", a.id, b.id]
    assert await store.audits() == []  # the audit table is there, empty
    again = await backend.make()  # a second open finds the schema current
    assert [version for version, _ in await backend.versions()] == [1, 2, 3]
    assert (await get(again, "old")).status is JobStatus.RUNNING


def test_submit_and_claim_search_the_queued_indexes_sqlite() -> None:
    """The tag lookups and the one-model claim are index searches, not table scans (SQLite's plan)."""
    from casola.store import sqlite_sql as sql

    conn = sqlite3.connect(":memory:")
    conn.execute(migrations.VERSION_TABLE_SQLITE)
    for _, (_, statements) in sorted(migrations.SQLITE.items()):
        for statement in statements:
            conn.execute(statement)
    insert = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql.INSERT}", tuple(range(30)))]
    assert "SEARCH casola_jobs USING INDEX casola_jobs_tenant_tags (model=? AND tenant=?)" in insert
    assert "SEARCH casola_jobs USING INDEX casola_jobs_queued_tags (model=?)" in insert
    claim = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql.CLAIM.format(marks='?')}", ("o", 1, 1, "m"))]
    assert "SEARCH casola_jobs USING INDEX casola_jobs_queued (model=?)" in claim
    assert not any("TEMP B-TREE" in step for step in claim)  # the index gives the claim order
    conn.close()
