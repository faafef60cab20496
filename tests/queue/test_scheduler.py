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


def test_a_full_line_makes_room_by_the_longest_line_first() -> None:
    """The line is full: a tenant with fewer waiting takes the newest place of the tenant with the
    most; a tenant as deep as any is the one refused (None)."""
    line = FairLine()
    a = [call("a", i) for i in range(5)]
    b = [call("b", i) for i in range(2)]
    for c in (*a, *b):
        line.push(c)
    assert line.evict_for("c") is a[-1]  # a newcomer: a's newest goes
    assert line.depth("a") == 4 and len(line) == 6
    assert line.evict_for("b") is a[-2]  # b waits less than a
    assert line.evict_for("a") is None  # a's is the longest line: a's newcomer is refused
    even = FairLine()
    for t in ("x", "y"):
        even.push(call(t))
    assert even.evict_for("x") is None  # as deep as any: refused, nobody evicted
    assert len(even) == 2


@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=60), st.sampled_from("abcde"))
def test_eviction_never_takes_from_a_line_no_longer_than_the_newcomers(tenants: list[str], newcomer: str) -> None:
    line = FairLine()
    for i, t in enumerate(tenants):
        line.push(call(t, i))
    depths = {t: line.depth(t) for t in "abcde"}
    victim = line.evict_for(newcomer)
    if victim is None:
        assert depths[newcomer] == max(depths.values())
    else:
        assert depths[victim.meta.tenant] == max(depths.values()) > depths[newcomer]
        assert victim.n == max(i for i, t in enumerate(tenants) if t == victim.meta.tenant)  # its newest
        assert len(line) == len(tenants) - 1 and victim not in line
