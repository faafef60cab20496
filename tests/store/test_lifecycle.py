"""The async job life cycle the queue node drives, run against every backend (SQLite, PostgreSQL).

Submit straight into a lease, renew many leases per heartbeat, take back a previous life's leases,
record the work time with the outcome, and deliver webhooks at least once. Times are passed in.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from casola.store import CANCELLED, WORKER_ERROR, Job, JobStatus, JobStore, NewJob, migrations
from tests.store.conftest import PG_DSN, Backend

__all__: list[str] = []

LEASE = 30.0
HOOK = "https://example.test/hook"


def new(model: str = "m", tenant: str = "t", **kw: Any) -> NewJob:
    return NewJob(tenant=tenant, model=model, payload=kw.pop("payload", b"p"), **kw)


async def leased(store: JobStore, owner: str = "node-a/w1", now: float = 10.0, **kw: Any) -> Job:
    """Submit a job straight into a lease held by `owner`; returns the RUNNING job."""
    job, created = await store.submit(new(**kw), now, lease_owner=owner, lease_s=LEASE)
    assert created and job.status is JobStatus.RUNNING
    return job


async def completed_with_hook(store: JobStore, now: float, tenant: str = "t") -> Job:
    job = await leased(store, now=now - 1.0, webhook_url=HOOK, tenant=tenant)
    assert await store.complete(job.id, job.fence, now, result=b"r")
    got = await store.get(job.id, None)
    assert got is not None
    return got


async def get(store: JobStore, job_id: str) -> Job:
    job = await store.get(job_id, None)
    assert job is not None
    return job


# -- new fields ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_new_job_has_no_work_time_and_no_webhook_state(store: JobStore) -> None:
    job, _ = await store.submit(new(webhook_url=HOOK), 1.0)
    got = await get(store, job.id)
    assert got == job
    assert (got.inference_ms, got.webhook_attempts, got.webhook_next, got.webhook_done) == (None, 0, None, False)


@pytest.mark.asyncio
async def test_inference_ms_is_recorded_with_the_outcome(store: JobStore) -> None:
    job = await leased(store)
    assert await store.complete(job.id, job.fence, 11.0, result=b"r", inference_ms=123.25)
    got = await get(store, job.id)
    assert (got.status, got.result, got.inference_ms) == (JobStatus.COMPLETED, b"r", 123.25)
    other = await leased(store)
    assert await store.complete(other.id, other.fence, 11.0, error_type="oom", error="no memory")
    assert (await get(store, other.id)).inference_ms is None


# -- submit with a lease -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_submit_with_a_lease_owner_stores_the_job_already_claimed(store: JobStore) -> None:
    job, created = await store.submit(new(), 5.0, lease_owner="node-a/w1", lease_s=LEASE)
    assert created
    assert (job.status, job.attempt, job.fence) == (JobStatus.RUNNING, 1, 1)
    assert (job.lease_owner, job.lease_expires, job.started_at) == ("node-a/w1", 5.0 + LEASE, 5.0)
    assert await get(store, job.id) == job
    assert await store.claim(["m"], "other", LEASE, 6.0) is None  # not in the queue
    assert await store.counts() == {"IN_QUEUE": 0, "IN_PROGRESS": 1, "COMPLETED": 0}


@pytest.mark.asyncio
async def test_a_job_submitted_leased_refuses_the_stale_fence_0(store: JobStore) -> None:
    job = await leased(store)
    assert not await store.complete(job.id, 0, 11.0, result=b"stale")
    assert not await store.renew(job.id, 0, LEASE, 11.0)
    assert await get(store, job.id) == job
    assert await store.complete(job.id, 1, 12.0, result=b"r")
    assert (await get(store, job.id)).result == b"r"


@pytest.mark.asyncio
async def test_an_idempotent_resubmit_is_returned_as_is_and_not_leased(store: JobStore) -> None:
    first, created = await store.submit(new(idempotency_key="k"), 1.0)
    assert created
    again, created = await store.submit(new(idempotency_key="k"), 2.0, lease_owner="node-a/w1", lease_s=LEASE)
    assert not created and again == first
    assert (again.status, again.fence, again.lease_owner, again.lease_expires) == (JobStatus.QUEUED, 0, "", None)
    assert await get(store, first.id) == first


@pytest.mark.asyncio
async def test_a_leased_submit_with_a_new_key_is_leased(store: JobStore) -> None:
    job, created = await store.submit(new(idempotency_key="k"), 1.0, lease_owner="node-a/w1", lease_s=LEASE)
    assert created and job.status is JobStatus.RUNNING
    again, created = await store.submit(new(idempotency_key="k"), 2.0, lease_owner="node-a/w2", lease_s=LEASE)
    assert not created and again == job  # still w1's lease


# -- completions make the webhook due -------------------------------------------------------------


@pytest.mark.asyncio
async def test_complete_makes_the_webhook_due_at_once(store: JobStore) -> None:
    hooked = await leased(store, webhook_url=HOOK)
    plain = await leased(store)
    assert hooked.webhook_next is None  # nothing due while running
    assert await store.complete(hooked.id, hooked.fence, 20.0, result=b"r")
    assert await store.complete(plain.id, plain.fence, 20.0, result=b"r")
    assert (await get(store, hooked.id)).webhook_next == 20.0
    assert (await get(store, plain.id)).webhook_next is None
    assert [job.id for job in await store.due_webhooks(20.0, 10)] == [hooked.id]


@pytest.mark.asyncio
async def test_every_path_that_completes_a_job_makes_its_webhook_due(store: JobStore) -> None:
    gave_up = await leased(store, webhook_url=HOOK, max_attempts=1)
    asked = await leased(store, webhook_url=HOOK)
    await store.cancel(asked.id, None, 11.0)  # running: asked, not completed
    retried = await leased(store, webhook_url=HOOK)  # attempts left: back to the queue, nothing due
    swept = {job.id: job for job in await store.requeue_expired(10.0 + LEASE)}
    assert (swept[gave_up.id].error_type, swept[gave_up.id].webhook_next) == (WORKER_ERROR, 10.0 + LEASE)
    assert (swept[asked.id].error_type, swept[asked.id].webhook_next) == (CANCELLED, 10.0 + LEASE)
    assert (swept[retried.id].status, swept[retried.id].webhook_next) == (JobStatus.QUEUED, None)

    queued, _ = await store.submit(new(webhook_url=HOOK), 50.0)
    cancelled = await store.cancel(queued.id, "t", 51.0)
    assert cancelled is not None and (cancelled.status, cancelled.webhook_next) == (JobStatus.COMPLETED, 51.0)
    running = await leased(store, now=50.0, webhook_url=HOOK)
    forced = await store.cancel(running.id, "t", 52.0, force=True)
    assert forced is not None and (forced.status, forced.webhook_next) == (JobStatus.COMPLETED, 52.0)
    last = await leased(store, now=50.0, webhook_url=HOOK, max_attempts=1)
    assert await store.release(last.id, last.fence, 53.0)
    assert (await get(store, last.id)).webhook_next == 53.0


# -- due_webhooks and webhook_attempted ----------------------------------------------------------


@pytest.mark.asyncio
async def test_due_webhooks_are_oldest_first_at_most_limit_and_held(store: JobStore) -> None:
    b = await completed_with_hook(store, 3.0)
    c = await completed_with_hook(store, 5.0)
    a = await completed_with_hook(store, 1.0)
    await completed_with_hook(store, 50.0)  # not due yet
    await leased(store, webhook_url=HOOK)  # running: nothing to deliver
    await store.submit(new(webhook_url=HOOK), 1.0)  # queued: nothing to deliver
    assert await store.due_webhooks(10.0, 0) == []

    first = await store.due_webhooks(10.0, 2, hold_s=5.0)
    assert [job.id for job in first] == [a.id, b.id]
    assert all(job.webhook_next == 15.0 for job in first)
    assert first == [await get(store, a.id), await get(store, b.id)]  # returned as stored
    assert [job.id for job in await store.due_webhooks(10.0, 2, hold_s=6.0)] == [c.id]  # held ones skipped
    assert await store.due_webhooks(14.0, 10) == []
    assert {job.id for job in await store.due_webhooks(15.0, 10)} == {a.id, b.id}  # their hold ran out
    assert [job.id for job in await store.due_webhooks(16.0, 10)] == [c.id]


@pytest.mark.asyncio
async def test_due_webhooks_take_tenants_in_turn(store: JobStore) -> None:
    """One tenant's backlog of due webhooks (receivers that fail, retried) does not hold up another
    tenant's: each batch takes the tenants round-robin, oldest first within each."""
    flood = [await completed_with_hook(store, 1.0 + i / 100, tenant="a") for i in range(30)]
    other = await completed_with_hook(store, 9.0, tenant="b")
    first = [job.id for job in await store.due_webhooks(10.0, 4)]
    assert first == [flood[0].id, other.id, flood[1].id, flood[2].id]
    rest = [job.id for job in await store.due_webhooks(10.0, 100)]
    assert rest == [job.id for job in flood[3:]]


@pytest.mark.asyncio
async def test_two_nodes_asking_for_due_webhooks_at_once_get_each_job_once(backend: Backend) -> None:
    one, two = await backend.make(), await backend.make()
    jobs = [await completed_with_hook(one, float(i)) for i in range(1, 21)]
    got = await asyncio.gather(*(node.due_webhooks(100.0, 3) for node in (one, two, one, two, one, two, one)))
    ids = [job.id for batch in got for job in batch]
    assert len(ids) == len(set(ids)) == 20
    assert set(ids) == {job.id for job in jobs}


@pytest.mark.asyncio
async def test_a_failed_delivery_is_retried_at_next_at_then_given_up(store: JobStore) -> None:
    job = await completed_with_hook(store, 1.0)
    assert await store.webhook_attempted(job.id, False, 2.0, 20.0)
    got = await get(store, job.id)
    assert (got.webhook_attempts, got.webhook_next, got.webhook_done) == (1, 20.0, False)
    assert await store.due_webhooks(19.0, 10) == []
    assert [due.id for due in await store.due_webhooks(20.0, 10)] == [job.id]
    assert await store.webhook_attempted(job.id, False, 21.0, None)  # no next attempt: give up
    got = await get(store, job.id)
    assert (got.webhook_attempts, got.webhook_next, got.webhook_done) == (2, None, True)
    assert await store.due_webhooks(1000.0, 10) == []
    assert (got.status, got.result) == (JobStatus.COMPLETED, b"r")  # the outcome is untouched


@pytest.mark.asyncio
async def test_a_delivered_webhook_is_done_and_stays_done(store: JobStore) -> None:
    job = await completed_with_hook(store, 1.0)
    assert await store.webhook_attempted(job.id, True, 2.0, 60.0)
    got = await get(store, job.id)
    assert (got.webhook_attempts, got.webhook_next, got.webhook_done) == (1, None, True)
    assert await store.webhook_attempted(job.id, False, 3.0, 30.0)  # another node's late failure
    got = await get(store, job.id)
    assert (got.webhook_attempts, got.webhook_next, got.webhook_done) == (2, None, True)
    assert await store.due_webhooks(1000.0, 10) == []


@pytest.mark.asyncio
async def test_webhook_attempted_refuses_jobs_without_a_webhook_to_deliver(store: JobStore) -> None:
    assert not await store.webhook_attempted("0" * 32, True, 1.0, None)
    running = await leased(store, webhook_url=HOOK)
    assert not await store.webhook_attempted(running.id, False, 11.0, 20.0)
    plain = await leased(store)
    assert await store.complete(plain.id, plain.fence, 11.0, result=b"r")
    assert not await store.webhook_attempted(plain.id, True, 12.0, None)
    assert (await get(store, running.id)) == running
    assert (await get(store, plain.id)).webhook_attempts == 0


# -- release_owner -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_release_owner_takes_back_a_previous_lifes_leases_at_once(store: JobStore) -> None:
    retried = await leased(store, "node-a/w1")
    assert await store.checkpoint(retried.id, 1, 1, b"ckpt", 11.0, LEASE)
    gave_up = await leased(store, "node-a/w2", max_attempts=1, webhook_url=HOOK)
    asked = await leased(store, "node-a/w1")
    await store.cancel(asked.id, None, 11.0)
    other_node = await leased(store, "node-b/w1")
    longer_name = await leased(store, "node-ab/w1")
    done = await leased(store, "node-a/w3")
    assert await store.complete(done.id, done.fence, 11.0, result=b"r")

    taken = {job.id: job for job in await store.release_owner("node-a/", 12.0)}  # long before expiry
    assert set(taken) == {retried.id, gave_up.id, asked.id}
    assert (taken[retried.id].status, taken[retried.id].lease_owner) == (JobStatus.QUEUED, "")
    assert (taken[retried.id].checkpoint, taken[retried.id].lease_expires) == (b"ckpt", None)
    assert (taken[gave_up.id].status, taken[gave_up.id].error_type) == (JobStatus.COMPLETED, WORKER_ERROR)
    assert taken[gave_up.id].webhook_next == 12.0
    assert (taken[asked.id].status, taken[asked.id].error_type) == (JobStatus.COMPLETED, CANCELLED)
    for job in taken.values():
        assert await get(store, job.id) == job
    assert await get(store, other_node.id) == other_node
    assert await get(store, longer_name.id) == longer_name
    assert not await store.complete(retried.id, 1, 13.0, result=b"late")  # the old fence is stale
    assert await store.release_owner("node-a/", 14.0) == []
    with pytest.raises(ValueError):
        await store.release_owner("", 14.0)


@pytest.mark.asyncio
async def test_release_owner_matches_the_prefix_literally(store: JobStore) -> None:
    owners = ["a%b/1", "axb/1", "a_c/1", "abc/1", "a\\d/1", "aXd/1", "A%b/1"]
    jobs = {owner: await leased(store, owner) for owner in owners}
    for prefix, owner in (("a%", "a%b/1"), ("a_", "a_c/1"), ("a\\", "a\\d/1")):
        taken = await store.release_owner(prefix, 12.0)
        assert [job.id for job in taken] == [jobs[owner].id], prefix
    for owner in ("axb/1", "abc/1", "aXd/1", "A%b/1"):
        assert (await get(store, jobs[owner].id)).status is JobStatus.RUNNING, owner


# -- renew_many ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_renew_many_extends_the_right_fences_and_returns_the_refused(store: JobStore) -> None:
    one, two = await leased(store), await leased(store)
    stale = await leased(store)
    finished = await leased(store)
    assert await store.complete(finished.id, finished.fence, 11.0, result=b"r")
    finished = await get(store, finished.id)
    missing = "0" * 32
    items = [(one.id, 1), (stale.id, 0), (two.id, 1), (finished.id, 1), (missing, 1)]
    refused = await store.renew_many(items, LEASE, 20.0)
    assert sorted(refused) == sorted([stale.id, finished.id, missing])
    assert (await get(store, one.id)).lease_expires == 20.0 + LEASE
    assert (await get(store, two.id)).lease_expires == 20.0 + LEASE
    assert await get(store, stale.id) == stale  # unchanged
    assert await get(store, finished.id) == finished
    assert await store.renew_many([], LEASE, 20.0) == []


@pytest.mark.asyncio
async def test_renew_many_keeps_leases_from_expiring(store: JobStore) -> None:
    jobs = [await leased(store) for _ in range(5)]
    assert await store.renew_many([(job.id, job.fence) for job in jobs], LEASE, 35.0) == []
    assert await store.requeue_expired(10.0 + LEASE) == []  # the old expiry has passed, the new one not
    assert len(await store.requeue_expired(35.0 + LEASE)) == 5


@pytest.mark.asyncio
async def test_renewing_and_releasing_many_leases_at_once_do_not_deadlock(backend: Backend) -> None:
    one, two = await backend.make(), await backend.make()
    jobs = [await leased(one, f"node-a/w{i % 3}") for i in range(30)]
    items = [(job.id, job.fence) for job in jobs]
    results = await asyncio.gather(
        one.renew_many(items, LEASE, 20.0),
        two.release_owner("node-a/", 20.0),
        one.renew_many(items[::-1], LEASE, 20.0),
        two.requeue_expired(5.0),  # none expired: takes nothing, waits for nothing
    )
    released = {job.id for job in results[1]}
    for job in jobs:
        got = await get(one, job.id)
        assert got.status is (JobStatus.QUEUED if job.id in released else JobStatus.RUNNING)
    assert set(results[0]) <= released and set(results[2]) <= released  # refused only once taken back


# -- migration 2 ---------------------------------------------------------------------------------

_V1_COLUMNS = (
    "id, tenant, model, status, payload, content_type, params, idempotency_key, webhook_url, priority,"
    " max_attempts, created_at, started_at, completed_at, attempt, fence, lease_owner, lease_expires,"
    " checkpoint, checkpoint_seq, progress, result, result_content_type, error_type, error, cancel_requested"
)
_V1_ROW: tuple[Any, ...] = ("old", "t", "m", "COMPLETED", b"p", "", "{}", "", HOOK, 0, 3, 1.0, 2.0, 3.0, 1, 1)
_V1_ROW += ("w", None, None, 0, 1.0, b"r", "", "", "", False)


async def _make_version_1(backend: Backend) -> None:
    """A store as casola with schema version 1 left it, with one completed job."""
    name, statements = migrations.SQLITE[1] if backend.name == "sqlite" else migrations.POSTGRES[1]
    if backend.name == "sqlite":
        with sqlite3.connect(backend.path) as conn:
            conn.execute(migrations.VERSION_TABLE_SQLITE)
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO casola_schema_version VALUES (1, ?)", (name,))
            marks = ", ".join("?" * len(_V1_ROW))
            conn.execute(f"INSERT INTO casola_jobs ({_V1_COLUMNS}) VALUES ({marks})", _V1_ROW)
        return
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'CREATE SCHEMA "{backend.schema}"')
        await conn.execute(f'SET search_path TO "{backend.schema}"')
        await conn.execute(migrations.VERSION_TABLE_POSTGRES)
        for statement in statements:
            await conn.execute(statement)
        await conn.execute("INSERT INTO casola_schema_version VALUES (1, $1)", name)
        marks = ", ".join(f"${i}" for i in range(1, len(_V1_ROW) + 1))
        await conn.execute(f"INSERT INTO casola_jobs ({_V1_COLUMNS}) VALUES ({marks})", *_V1_ROW)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_migration_2_adds_the_columns_to_a_version_1_store(backend: Backend) -> None:
    await _make_version_1(backend)
    store = await backend.make()
    assert [version for version, _ in await backend.versions()] == list(range(1, migrations.latest() + 1))
    old = await get(store, "old")
    assert (old.status, old.result, old.webhook_url) == (JobStatus.COMPLETED, b"r", HOOK)
    assert (old.inference_ms, old.webhook_attempts, old.webhook_next, old.webhook_done) == (None, 0, None, False)
    assert await store.due_webhooks(1000.0, 10) == []  # whether it was delivered is unknown: not due
    job = await leased(store, webhook_url=HOOK)
    assert await store.complete(job.id, job.fence, 11.0, result=b"r", inference_ms=7.5)
    assert [due.inference_ms for due in await store.due_webhooks(11.0, 10)] == [7.5]


@pytest.mark.asyncio
async def test_claim_many_leases_up_to_limit_in_claim_order_and_never_twice(store: JobStore) -> None:
    low = [(await store.submit(new(priority=0), now=float(i)))[0] for i in range(4)]
    high = (await store.submit(new(priority=5), now=9.0))[0]
    await store.submit(new(model="other"), now=1.0)
    first = await store.claim_many(["m"], "node-a/w1", 30.0, 20.0, 3)
    assert [j.id for j in first] == [high.id, low[0].id, low[1].id]
    assert all(j.status is JobStatus.RUNNING and j.fence == 1 and j.lease_owner == "node-a/w1" for j in first)
    rest = await store.claim_many(["m"], "node-a/w2", 30.0, 20.0, 10)
    assert [j.id for j in rest] == [low[2].id, low[3].id]  # fewer than asked: the model is drained
    assert await store.claim_many(["m"], "node-a/w2", 30.0, 20.0, 10) == []
    assert await store.claim_many(["m"], "node-a/w2", 30.0, 20.0, 0) == []


@pytest.mark.asyncio
async def test_concurrent_claim_many_never_hand_out_a_job_twice(store: JobStore) -> None:
    for i in range(40):
        await store.submit(new(), now=float(i))
    batches = await asyncio.gather(*(store.claim_many(["m"], f"n/w{k}", 30.0, 50.0, 7) for k in range(8)))
    ids = [j.id for batch in batches for j in batch]
    assert len(ids) == len(set(ids)) == 40


@pytest.mark.asyncio
async def test_a_checkpoint_records_progress_in_the_same_write(store: JobStore) -> None:
    job = await leased(store)
    assert await store.checkpoint(job.id, job.fence, 1, b"s1", 11.0, LEASE, 0.25)
    assert await store.checkpoint(job.id, job.fence, 2, b"s2", 12.0, LEASE)  # no progress: kept
    got = await store.get(job.id, None)
    assert got is not None and got.progress == 0.25 and got.checkpoint == b"s2"
    assert not await store.checkpoint(job.id, job.fence + 1, 3, b"x", 13.0, LEASE, 0.9)
    got = await store.get(job.id, None)
    assert got is not None and got.progress == 0.25
