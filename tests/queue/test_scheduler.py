"""The sync line and the pool rules (DESIGN "Capacity pools and scheduling"), without sockets."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from casola.queue.scheduler import FairLine, async_free, pick_async, pick_sync


class FakeCall:
    """What the line reads of a call: its tenant (identity is the call)."""

    def __init__(self, tenant: str, n: int) -> None:
        self.meta = SimpleNamespace(tenant=tenant)
        self.n = n


def call(tenant: str, n: int = 0) -> Any:
    return FakeCall(tenant, n)


def worker(pool: str, free: int, name: str = "") -> Any:
    return SimpleNamespace(pool=pool, free=free, name=name or f"{pool}-{free}")


def test_one_tenant_is_fifo() -> None:
    line = FairLine()
    calls = [call("a", i) for i in range(5)]
    for c in calls:
        line.push(c)
    assert [line.pop() for _ in range(5)] == calls
    assert not line and len(line) == 0


def test_a_flood_does_not_starve_another_tenant() -> None:
    line = FairLine()
    flood = [call("flood", i) for i in range(1000)]
    for c in flood:
        line.push(c)
    late = [call("late", i) for i in range(3)]
    for c in late:
        line.push(c)
    served = [line.pop() for _ in range(6)]
    # round-robin: the late tenant's three requests are among the first six served, in their order
    assert [c for c in served if c.meta.tenant == "late"] == late
    assert served[0] is flood[0] and served[1] is late[0]


def test_remove_from_the_middle_and_retry_at_the_front() -> None:
    line = FairLine()
    a = [call("a", i) for i in range(3)]
    b = call("b")
    for c in [*a, b]:
        line.push(c)
    assert line.remove(a[1]) and not line.remove(a[1])
    assert a[1] not in line and a[0] in line
    retried = call("b", 99)
    line.push(retried, front=True)
    assert line.pop() is retried  # its tenant goes first and it is first in its line
    assert [line.pop() for _ in range(3)] == [a[0], b, a[2]]
    with pytest.raises(IndexError):
        line.pop()


def test_ahead_estimates_the_round_robin_position() -> None:
    line = FairLine()
    for i in range(100):
        line.push(call("flood", i))
    assert line.ahead("new") == 1  # one turn of the flooding tenant, then the new one
    assert line.ahead("flood") == 100  # behind all of its own
    line.push(call("new"))
    assert line.ahead("new") == 3


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.booleans()), max_size=200))
def test_every_call_comes_out_once_and_each_tenant_in_order(ops: list[tuple[str, bool]]) -> None:
    line = FairLine()
    pushed: list[Any] = []
    removed: set[int] = set()
    for i, (tenant, remove_one) in enumerate(ops):
        c = call(tenant, i)
        line.push(c)
        pushed.append(c)
        if remove_one and pushed[i // 2].n not in removed:
            assert line.remove(pushed[i // 2])
            removed.add(pushed[i // 2].n)
    out = list(line.drain())
    assert sorted(c.n for c in out) == sorted(c.n for c in pushed if c.n not in removed)
    for t in "abcd":
        seq = [c.n for c in out if c.meta.tenant == t]
        assert seq == sorted(seq)


def test_sync_takes_its_pool_first_then_shared_then_async() -> None:
    s, sh, a = worker("sync", 1), worker("shared", 5), worker("async", 9)
    assert pick_sync([a, sh, s]) is s
    assert pick_sync([a, sh, worker("sync", 0)]) is sh
    assert pick_sync([a, worker("shared", 0), worker("sync", 0)]) is a
    assert pick_sync([worker("async", 0)]) is None
    assert pick_sync([s, worker("sync", 3)]).free == 3  # most free within the pool
    assert pick_sync([s], exclude=s) is None


def test_async_jobs_never_take_sync_capacity_unless_lent() -> None:
    s = worker("sync", 4)
    assert async_free(s, lend=False, reserve=1) == 0
    assert async_free(s, lend=True, reserve=1) == 3
    assert async_free(worker("sync", 1), lend=True, reserve=1) == 0
    assert async_free(worker("shared", 2), lend=False, reserve=1) == 2
    assert pick_async([s, worker("async", 0)], lend=False, reserve=1) is None
    assert pick_async([s, worker("async", 2)], lend=True, reserve=0) is s
