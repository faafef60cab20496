"""Content-filter audit records (`record_audit`, `audits`, `purge`), run against every backend."""

from __future__ import annotations

from typing import Any

import pytest

from casola.store import AuditRecord, JobStore, NewJob, StoreError

__all__: list[str] = []


def rec(n: int, at: float, tenant: str = "t", **kw: Any) -> AuditRecord:
    return AuditRecord(id=f"node-1-{n}", at=at, tenant=tenant, model="m", **kw)


def ids(records: list[AuditRecord]) -> list[str]:
    return [r.id.removeprefix("node-1-") for r in records]


@pytest.mark.asyncio
async def test_record_audit_round_trips_every_field(store: JobStore) -> None:
    full = AuditRecord(
        id="node-1-1",
        at=1700000000.125,
        tenant="acme",
        model="llama-3",
        request_id="0f" * 16,
        policy="race",
        outcome="aborted",
        flagged=True,
        label="violence",
        score=0.93,
        classifier="llama-guard-3 ✓",
        filter_ms=12.5,
        before_response=True,
        detail="héllo\nworld",
    )
    bare = AuditRecord(id="node-1-2", at=1700000001.0, tenant="acme", model="llama-3")
    await store.record_audit([full, bare])
    got = await store.audits()
    assert got == [full, bare]
    assert type(got[0].flagged) is bool and type(got[0].at) is float and type(got[1].score) is float
    assert (got[1].flagged, got[1].before_response, got[1].request_id, got[1].score) == (False, False, "", 0.0)


@pytest.mark.asyncio
async def test_audits_filter_by_tenant_since_and_limit_oldest_first(store: JobStore) -> None:
    await store.record_audit([rec(3, 30.0, "a"), rec(1, 10.0, "a"), rec(2, 20.0, "b")])
    await store.record_audit([rec(4, 20.0, "a"), rec(5, 40.0, "b")])
    assert ids(await store.audits()) == ["1", "2", "4", "3", "5"]  # same `at`: the one stored first
    assert ids(await store.audits(tenant="a")) == ["1", "4", "3"]
    assert ids(await store.audits(tenant="b", since=20.0)) == ["2", "5"]  # since is inclusive
    assert ids(await store.audits(since=20.5)) == ["3", "5"]
    assert ids(await store.audits(limit=2)) == ["1", "2"]
    assert ids(await store.audits(tenant="a", since=15.0, limit=1)) == ["4"]
    assert await store.audits(tenant="nobody") == []
    assert await store.audits(limit=0) == []


@pytest.mark.asyncio
async def test_a_duplicate_id_is_ignored(store: JobStore) -> None:
    first = rec(1, 10.0, outcome="late")
    await store.record_audit([first])
    await store.record_audit([rec(1, 99.0, outcome="clean"), rec(2, 11.0)])  # a retry carries a known id
    await store.record_audit([rec(3, 12.0), rec(3, 13.0)])  # twice in one batch: the first is kept
    got = await store.audits()
    assert [r.id for r in got] == ["node-1-1", "node-1-2", "node-1-3"]
    assert got[0] == first and got[2].at == 12.0
    await store.record_audit([])  # nothing to store


@pytest.mark.asyncio
async def test_a_failed_batch_stores_nothing(store: JobStore) -> None:
    bad = AuditRecord(id="bad", at=1.0, tenant="t", model="m", detail=object())  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        await store.record_audit([rec(1, 1.0), bad])
    assert await store.audits() == []
    await store.record_audit([rec(1, 1.0)])  # the store still works
    assert len(await store.audits()) == 1


@pytest.mark.asyncio
async def test_purge_deletes_old_audit_records_and_counts_only_jobs(store: JobStore) -> None:
    await store.record_audit([rec(1, 50.0), rec(2, 100.0), rec(3, 150.0, "other")])
    job, _ = await store.submit(NewJob(tenant="t", model="m", payload=b"p"), 10.0, lease_owner="w", lease_s=30.0)
    assert await store.complete(job.id, job.fence, 60.0, result=b"r")
    assert await store.purge(1000.0, 900.0) == 1  # cutoff 100: the job (60.0) and record 1 (50.0)
    assert [r.id for r in await store.audits()] == ["node-1-2", "node-1-3"]  # 100.0 is not before 100
    assert await store.get(job.id, None) is None
    assert await store.purge(1000.0, 849.0) == 0  # cutoff 151: no job, two records
    assert await store.audits() == []


@pytest.mark.asyncio
async def test_audits_need_an_open_store(store: JobStore) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.record_audit([rec(1, 1.0)])
    with pytest.raises(StoreError):
        await store.audits()
