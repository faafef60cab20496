"""The JobStore contract, run against every backend (SQLite file, PostgreSQL schema).

Times are passed in, so leases expire when a test says so; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from casola.store import CANCELLED, WORKER_ERROR, Job, JobStatus, JobStore, NewJob, StoreError
from casola.store.migrations import latest
from tests.store.conftest import Backend

__all__: list[str] = []

PAYLOAD = bytes(range(256)) * 17 + b"\x00end"
LEASE = 30.0


def new(model: str = "m", tenant: str = "t", **kw: Any) -> NewJob:
    return NewJob(tenant=tenant, model=model, payload=kw.pop("payload", b"p"), **kw)


async def claimed(store: JobStore, model: str = "m", now: float = 10.0, **kw: Any) -> Job:
    """Submit a job and claim it; returns the RUNNING job."""
    job, _ = await store.submit(new(model, **kw), now)
    got = await store.claim([model], "worker-1", LEASE, now)
    assert got is not None and got.id == job.id
    return got


@pytest.mark.asyncio
async def test_submit_then_get_round_trips_every_field(store: JobStore) -> None:
    params = {"prompt": "a cat", "steps": 30, "nested": {"list": [1, 2.5, None, True]}, "unicode": "héllo ✓"}
    spec = new(
        payload=PAYLOAD,
        content_type="application/json",
        params=params,
        webhook_url="https://example.test/hook",
        max_attempts=5,
        priority=7,
    )
    job, created = await store.submit(spec, 1000.25)
    assert created
    assert len(job.id) == 32 and int(job.id, 16) >= 0  # uuid4 hex
    got = await store.get(job.id, "t")
    assert got == job
    assert got is not None
    assert got.payload == PAYLOAD and type(got.payload) is bytes
    assert got.params == params
    assert (got.status, got.created_at, got.attempt, got.fence) == (JobStatus.QUEUED, 1000.25, 0, 0)
    assert (got.max_attempts, got.priority, got.webhook_url) == (5, 7, "https://example.test/hook")
    assert got.started_at is None and got.completed_at is None and got.lease_expires is None
    assert await store.get(job.id, None) == job
    assert await store.get("0" * 32, None) is None


@pytest.mark.asyncio
async def test_submit_is_idempotent_per_tenant_and_key(store: JobStore) -> None:
    first, created = await store.submit(new(payload=b"first", idempotency_key="k1"), 1.0)
    assert created
    again, created = await store.submit(new(payload=b"second", idempotency_key="k1"), 2.0)
    assert not created
    assert again.id == first.id and again.payload == b"first" and again.created_at == 1.0
    other, created = await store.submit(new(tenant="t2", idempotency_key="k1"), 3.0)
    assert created and other.id != first.id
    no_key_a, _ = await store.submit(new(), 4.0)
    no_key_b, created = await store.submit(new(), 4.0)
    assert created and no_key_a.id != no_key_b.id
    # the existing job is returned as it is now, not as first submitted
    running = await store.claim(["m"], "w", LEASE, 5.0)
    assert running is not None and running.id == first.id
    again, created = await store.submit(new(idempotency_key="k1"), 6.0)
    assert not created and again.status is JobStatus.RUNNING
    assert (await store.counts())["IN_QUEUE"] == 3


@pytest.mark.asyncio
async def test_tenants_only_see_and_cancel_their_own_jobs(store: JobStore) -> None:
    job, _ = await store.submit(new(tenant="alice"), 1.0)
    assert await store.get(job.id, "bob") is None
    assert await store.cancel(job.id, "bob", 2.0) is None
    assert await store.cancel(job.id, "bob", 2.0, force=True) is None
    unchanged = await store.get(job.id, "alice")
    assert unchanged is not None and unchanged.status is JobStatus.QUEUED and not unchanged.cancel_requested
    cancelled = await store.cancel(job.id, "alice", 3.0)
    assert cancelled is not None and cancelled.status is JobStatus.COMPLETED


@pytest.mark.asyncio
async def test_claim_takes_priority_first_then_the_oldest(store: JobStore) -> None:
    # One tenant each: every job gets the head's fair-queuing tag, so age decides (tests/store/test_fairness.py).
    ids = {}
    for name, now, priority in [("old", 1.0, 0), ("new", 5.0, 0), ("urgent", 9.0, 5), ("tie_a", 3.0, 0)]:
        job, _ = await store.submit(new(tenant=name, priority=priority), now)
        ids[job.id] = name
    tie_b, _ = await store.submit(new(tenant="tie_b"), 3.0)  # same created_at as tie_a: submission order decides
    ids[tie_b.id] = "tie_b"
    order = []
    while (job := await store.claim(["m"], "w", LEASE, 20.0)) is not None:
        order.append(ids[job.id])
    assert order == ["urgent", "old", "tie_a", "tie_b", "new"]


@pytest.mark.asyncio
async def test_claim_only_takes_the_models_asked_for(store: JobStore) -> None:
    a, _ = await store.submit(new("a"), 1.0)
    b, _ = await store.submit(new("b"), 2.0)
    c, _ = await store.submit(new("c"), 0.5)
    assert await store.claim([], "w", LEASE, 3.0) is None
    assert await store.claim(["zzz"], "w", LEASE, 3.0) is None
    with pytest.raises(ValueError):
        await store.claim("a", "w", LEASE, 3.0)
    got = await store.claim(["b", "a"], "w", LEASE, 3.0)
    assert got is not None and got.id == a.id
    got = await store.claim(["b", "a"], "w", LEASE, 3.0)
    assert got is not None and got.id == b.id
    assert await store.claim(["b", "a"], "w", LEASE, 3.0) is None
    left = await store.get(c.id, None)
    assert left is not None and left.status is JobStatus.QUEUED


@pytest.mark.asyncio
async def test_claim_leases_the_job(store: JobStore) -> None:
    job, _ = await store.submit(new(), 1.0)
    got = await store.claim(["m"], "worker-7", 12.5, 2.0)
    assert got is not None and got.id == job.id
    assert (got.status, got.attempt, got.fence, got.lease_owner) == (JobStatus.RUNNING, 1, 1, "worker-7")
    assert got.lease_expires == 14.5 and got.started_at == 2.0
    assert await store.get(job.id, None) == got


@pytest.mark.asyncio
async def test_concurrent_claimers_never_share_a_job_and_take_them_all(backend: Backend) -> None:
    nodes = [await backend.make()]
    nodes.append(await backend.make() if backend.name == "postgres" else nodes[0])  # two queue nodes
    submitted = {(await nodes[0].submit(new(payload=b"%d" % i), float(i)))[0].id for i in range(50)}
    # exactly as many concurrent claims as jobs: a claim may skip a job another claim holds, but it
    # never comes back empty while a job nobody holds is queued, nor shares one
    jobs = await asyncio.gather(*(nodes[i % 2].claim(["m"], f"w{i}", LEASE, 100.0) for i in range(50)))
    claimed_ids = [job.id for job in jobs if job is not None]
    assert len(claimed_ids) == len(set(claimed_ids)) == 50
    assert set(claimed_ids) == submitted
    assert all(job is not None and job.fence == 1 and job.lease_owner == f"w{i}" for i, job in enumerate(jobs))
    assert await nodes[1].claim(["m"], "late", LEASE, 100.0) is None
    assert (await nodes[1].counts())["IN_PROGRESS"] == 50


@pytest.mark.asyncio
async def test_claimers_racing_until_the_queue_is_empty_share_nothing(backend: Backend) -> None:
    nodes = [await backend.make()]
    nodes.append(await backend.make() if backend.name == "postgres" else nodes[0])
    submitted = {(await nodes[0].submit(new(), float(i)))[0].id for i in range(50)}

    async def claimer(store: JobStore, owner: str) -> list[str]:
        got = []
        while (job := await store.claim(["m"], owner, LEASE, 100.0)) is not None:
            got.append(job.id)
        return got

    results = await asyncio.gather(*(claimer(nodes[i % 2], f"w{i}") for i in range(16)))
    claimed_ids = [job_id for got in results for job_id in got]
    assert len(claimed_ids) == len(set(claimed_ids)) == 50
    assert set(claimed_ids) == submitted


@pytest.mark.asyncio
async def test_the_right_fence_renews_checkpoints_and_completes(store: JobStore) -> None:
    job = await claimed(store, now=10.0)
    assert await store.renew(job.id, job.fence, LEASE, 20.0, progress=0.25)
    got = await store.get(job.id, None)
    assert got is not None and got.lease_expires == 20.0 + LEASE and got.progress == 0.25
    assert await store.renew(job.id, job.fence, LEASE, 21.0)  # progress omitted: kept
    got = await store.get(job.id, None)
    assert got is not None and got.progress == 0.25

    assert await store.checkpoint(job.id, job.fence, 2, b"state-2", 30.0, LEASE)
    got = await store.get(job.id, None)
    assert got is not None and (got.checkpoint, got.checkpoint_seq, got.lease_expires) == (b"state-2", 2, 60.0)
    # an older or repeated seq renews the lease and keeps the newer checkpoint
    assert await store.checkpoint(job.id, job.fence, 1, b"state-1", 40.0, LEASE)
    assert await store.checkpoint(job.id, job.fence, 2, b"state-2-again", 41.0, LEASE)
    got = await store.get(job.id, None)
    assert got is not None and (got.checkpoint, got.checkpoint_seq, got.lease_expires) == (b"state-2", 2, 71.0)

    assert await store.complete(job.id, job.fence, 50.0, result=b"\x89PNG...", content_type="image/png")
    done = await store.get(job.id, None)
    assert done is not None and done.status is JobStatus.COMPLETED and done.completed_at == 50.0
    assert (done.result, done.result_content_type, done.error_type) == (b"\x89PNG...", "image/png", "")
    assert done.lease_expires is None


@pytest.mark.asyncio
async def test_a_stale_fence_is_refused_and_changes_nothing(store: JobStore) -> None:
    job = await claimed(store, now=10.0)
    assert await store.checkpoint(job.id, job.fence, 1, b"old-worker", 11.0, LEASE)
    assert [j.id for j in await store.requeue_expired(11.0 + LEASE)] == [job.id]
    retaken = await store.claim(["m"], "worker-2", LEASE, 50.0)
    assert retaken is not None and retaken.fence == job.fence + 1 and retaken.attempt == 2
    before = await store.get(job.id, None)
    stale = job.fence
    assert not await store.renew(job.id, stale, LEASE, 60.0, progress=0.9)
    assert not await store.checkpoint(job.id, stale, 9, b"stale", 60.0, LEASE)
    assert not await store.release(job.id, stale, 60.0)
    assert not await store.complete(job.id, stale, 60.0, result=b"stale result")
    assert not await store.renew(job.id, stale + 5, LEASE, 60.0)  # a future fence is as wrong
    assert await store.get(job.id, None) == before
    assert before is not None and before.checkpoint == b"old-worker"
    assert not await store.renew("0" * 32, 1, LEASE, 60.0)  # no such job


@pytest.mark.asyncio
async def test_the_result_is_recorded_exactly_once(store: JobStore) -> None:
    job = await claimed(store, now=2.0)
    assert await store.complete(job.id, job.fence, 3.0, result=b"first")
    assert not await store.complete(job.id, job.fence, 4.0, result=b"second")
    assert not await store.complete(job.id, job.fence, 4.0, error_type="boom", error="late error")
    assert not await store.renew(job.id, job.fence, LEASE, 4.0)
    assert not await store.checkpoint(job.id, job.fence, 1, b"x", 4.0, LEASE)
    assert await store.requeue_expired(1e9) == []
    got = await store.get(job.id, None)
    assert got is not None and (got.result, got.completed_at, got.error_type) == (b"first", 3.0, "")
    other, _ = await store.submit(new(), 5.0)
    assert not await store.complete(other.id, 0, 6.0, result=b"never claimed")


@pytest.mark.asyncio
async def test_expired_lease_requeues_with_checkpoint_then_gives_up(store: JobStore) -> None:
    job = await claimed(store, now=10.0, max_attempts=2)
    assert await store.checkpoint(job.id, job.fence, 3, b"step-3", 20.0, LEASE)  # lease until 50
    assert await store.requeue_expired(49.9) == []
    requeued = await store.requeue_expired(50.0)
    assert [j.id for j in requeued] == [job.id]
    back = requeued[0]
    assert back.status is JobStatus.QUEUED and (back.lease_owner, back.lease_expires) == ("", None)
    assert (back.checkpoint, back.checkpoint_seq, back.attempt, back.fence) == (b"step-3", 3, 1, 1)
    assert await store.get(job.id, None) == back
    assert await store.queue_position(job.id) == 0

    second = await store.claim(["m"], "worker-2", LEASE, 60.0)
    assert second is not None and (second.attempt, second.fence, second.checkpoint) == (2, 2, b"step-3")
    gave_up = await store.requeue_expired(60.0 + LEASE)
    assert [j.id for j in gave_up] == [job.id]
    done = gave_up[0]
    assert done.status is JobStatus.COMPLETED and done.error_type == WORKER_ERROR
    assert "gave up after 2 attempts" in done.error and done.completed_at == 60.0 + LEASE
    assert done.result is None and done.checkpoint == b"step-3"
    assert await store.get(job.id, None) == done
    assert await store.claim(["m"], "worker-3", LEASE, 200.0) is None
    assert await store.requeue_expired(1e9) == []


@pytest.mark.asyncio
async def test_requeue_expired_takes_only_the_expired_leases(store: JobStore) -> None:
    short = await claimed(store, now=10.0)
    long_ = await claimed(store, now=20.0)
    assert await store.renew(long_.id, long_.fence, 100.0, 20.0)
    changed = await store.requeue_expired(10.0 + LEASE)
    assert [j.id for j in changed] == [short.id]
    still = await store.get(long_.id, None)
    assert still is not None and still.status is JobStatus.RUNNING and still.fence == long_.fence


@pytest.mark.asyncio
async def test_release_requeues_at_once_or_gives_up(store: JobStore) -> None:
    job = await claimed(store, now=10.0, max_attempts=2)
    assert not await store.release(job.id, job.fence + 1, 11.0)
    assert await store.release(job.id, job.fence, 11.0)
    back = await store.get(job.id, None)
    assert back is not None and back.status is JobStatus.QUEUED and back.lease_owner == ""
    assert not await store.release(job.id, job.fence, 12.0)  # not RUNNING any more
    again = await store.claim(["m"], "w", LEASE, 13.0)
    assert again is not None and again.attempt == 2
    assert await store.release(again.id, again.fence, 14.0)
    done = await store.get(job.id, None)
    assert done is not None and done.status is JobStatus.COMPLETED and done.error_type == WORKER_ERROR
    assert done.completed_at == 14.0


@pytest.mark.asyncio
async def test_cancel_a_queued_job_completes_it(store: JobStore) -> None:
    job, _ = await store.submit(new(), 1.0)
    cancelled = await store.cancel(job.id, None, 2.0)
    assert cancelled is not None and cancelled.status is JobStatus.COMPLETED
    assert (cancelled.error_type, cancelled.completed_at, cancelled.attempt) == (CANCELLED, 2.0, 0)
    assert await store.get(job.id, "t") == cancelled
    assert await store.claim(["m"], "w", LEASE, 3.0) is None
    assert await store.cancel(job.id, "t", 4.0) == cancelled  # a completed job is returned unchanged
    assert await store.cancel("0" * 32, None, 4.0) is None


@pytest.mark.asyncio
async def test_cancel_a_running_job_requests_it(store: JobStore) -> None:
    job = await claimed(store, now=10.0)
    asked = await store.cancel(job.id, "t", 11.0)
    assert asked is not None and asked.status is JobStatus.RUNNING and asked.cancel_requested
    assert asked.fence == job.fence and asked.completed_at is None
    assert await store.renew(job.id, job.fence, LEASE, 12.0)  # the worker still holds its lease
    assert await store.complete(job.id, job.fence, 13.0, error_type=CANCELLED, error="stream ended")
    done = await store.get(job.id, None)
    assert done is not None and done.status is JobStatus.COMPLETED and done.error_type == CANCELLED


@pytest.mark.asyncio
async def test_cancel_with_force_completes_a_running_job_at_once(store: JobStore) -> None:
    job = await claimed(store, now=10.0)
    done = await store.cancel(job.id, "t", 11.0, force=True)
    assert done is not None and done.status is JobStatus.COMPLETED and done.error_type == CANCELLED
    assert done.completed_at == 11.0 and done.lease_expires is None
    assert not await store.complete(job.id, job.fence, 12.0, result=b"too late")
    assert await store.get(job.id, None) == done


@pytest.mark.asyncio
async def test_a_cancel_requested_job_whose_lease_expires_is_not_requeued(store: JobStore) -> None:
    job = await claimed(store, now=10.0, max_attempts=5)
    await store.cancel(job.id, None, 11.0)
    changed = await store.requeue_expired(10.0 + LEASE)
    assert [(j.id, j.status, j.error_type) for j in changed] == [(job.id, JobStatus.COMPLETED, CANCELLED)]


@pytest.mark.asyncio
async def test_queue_position_counts_the_jobs_ahead_for_the_same_model(store: JobStore) -> None:
    first, _ = await store.submit(new(), 1.0)
    second, _ = await store.submit(new(), 2.0)
    third, _ = await store.submit(new(), 3.0)
    other, _ = await store.submit(new("other"), 0.5)
    assert [await store.queue_position(j.id) for j in (first, second, third, other)] == [0, 1, 2, 0]
    urgent, _ = await store.submit(new(priority=1), 4.0)
    assert [await store.queue_position(j.id) for j in (urgent, first, third)] == [0, 1, 3]
    running = await store.claim(["m"], "w", LEASE, 5.0)
    assert running is not None and running.id == urgent.id
    assert await store.queue_position(urgent.id) is None
    assert [await store.queue_position(j.id) for j in (first, second, third)] == [0, 1, 2]
    await store.cancel(first.id, None, 6.0)
    assert await store.queue_position(first.id) is None
    assert await store.queue_position(third.id) == 1
    assert await store.queue_position("0" * 32) is None


@pytest.mark.asyncio
async def test_purge_deletes_only_jobs_completed_before_the_retention(store: JobStore) -> None:
    old = await claimed(store, now=10.0)
    assert await store.complete(old.id, old.fence, 100.0, result=b"old")
    recent = await claimed(store, now=10.0)
    assert await store.complete(recent.id, recent.fence, 200.0, result=b"recent")
    queued, _ = await store.submit(new(), 1.0)
    running = await claimed(store, "other", now=1.0)
    assert await store.counts() == {"IN_QUEUE": 1, "IN_PROGRESS": 1, "COMPLETED": 2}
    assert await store.purge(1000.0, 900.0) == 0  # cutoff 100: not strictly before
    assert await store.purge(1000.0, 850.0) == 1
    assert await store.get(old.id, None) is None
    for kept in (recent, queued, running):
        assert await store.get(kept.id, None) is not None
    assert await store.counts() == {"IN_QUEUE": 1, "IN_PROGRESS": 1, "COMPLETED": 1}
    assert await store.purge(1e9, 0.0) == 1


@pytest.mark.asyncio
async def test_a_purged_idempotency_key_can_be_used_again(store: JobStore) -> None:
    job = await claimed(store, now=1.0, idempotency_key="once")
    assert await store.complete(job.id, job.fence, 2.0, result=b"r")
    assert await store.purge(100.0, 10.0) == 1
    fresh, created = await store.submit(new(idempotency_key="once"), 101.0)
    assert created and fresh.id != job.id


@pytest.mark.asyncio
async def test_migrations_apply_once(backend: Backend) -> None:
    first = await backend.make()
    await first.open()  # opening an open store is a no-op
    job, _ = await first.submit(new(), 1.0)
    expected = [(version, name) for version, name in await backend.versions()]
    assert [version for version, _ in expected] == list(range(1, latest() + 1))
    second = await backend.make()  # a second node (or a restart) finds the schema current
    assert await backend.versions() == expected
    assert await second.get(job.id, None) == job
    await first.close()
    await first.close()  # closing twice is a no-op
    await first.open()  # and a closed store opens again
    assert await first.get(job.id, None) == job


@pytest.mark.asyncio
async def test_concurrent_opens_migrate_once(backend: Backend) -> None:
    stores = [backend.new() for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    assert [version for version, _ in await backend.versions()] == list(range(1, latest() + 1))


@pytest.mark.asyncio
async def test_a_store_that_is_not_open_raises_store_error(backend: Backend) -> None:
    store = backend.new()
    with pytest.raises(StoreError):
        await store.get("x", None)
    await store.open()
    await store.close()
    with pytest.raises(StoreError):
        await store.submit(new(), 1.0)


@pytest.mark.asyncio
async def test_invalid_jobs_are_refused_before_the_store(store: JobStore) -> None:
    for bad in (new(max_attempts=0), new(priority=2**40), new(tenant=""), new(params={"x": object()})):
        with pytest.raises(ValueError):
            await store.submit(bad, 1.0)
    assert await store.counts() == {"IN_QUEUE": 0, "IN_PROGRESS": 0, "COMPLETED": 0}
