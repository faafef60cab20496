"""Who goes next (DESIGN "Capacity pools and scheduling").

Workers register into a pool: `sync`, `async` or `shared`. Sync requests take sync capacity first,
then shared, then async (any free slot in the system); async jobs take async and shared capacity
only, and idle sync capacity when the node is configured to lend it (keeping `reserve` slots of
each sync worker free for the next sync arrival). Whenever a slot frees, a waiting sync request is
served before any waiting job: the node serves its `FairLine` first and only then lets the job pump
claim (`casola.queue.jobs`).

Within the sync class, tenants are served round-robin: one FIFO per tenant and a ring of the tenants
that have requests waiting, so one tenant's flood costs another tenant at most one request's turn
per round. Every operation is O(1): OrderedDicts give O(1) removal of a cancelled or expired call
from the middle of its line and O(1) access to both ends.

It reads two things of what it orders, each stated as a Protocol here: a waiting call's tenant
(`Waiting`) and a worker's free slots and pool (`Slots`); the node's records satisfy both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from casola.wire import RequestMeta

__all__ = ["POOLS", "FairLine", "Slots", "Waiting", "async_free", "pick_async", "pick_sync"]

POOLS: Final = ("sync", "shared", "async")  # the order sync requests take them in
_RANK: Final = {"sync": 0, "shared": 1, "async": 2}


class Waiting(Protocol):
    """A call as the line sees it: its tenant is in its request metadata; identity is the call."""

    @property
    def meta(self) -> RequestMeta: ...


class Slots(Protocol):
    """A worker as the pool rules see it."""

    @property
    def free(self) -> int: ...

    @property
    def pool(self) -> str: ...


CallT = TypeVar("CallT", bound=Waiting)
WorkerT = TypeVar("WorkerT", bound=Slots)


class FairLine(Generic[CallT]):
    """The sync requests of one model waiting for a slot: a FIFO per tenant, tenants round-robin."""

    __slots__ = ("_lines", "_ring", "n")

    def __init__(self) -> None:
        self._lines: dict[str, OrderedDict[CallT, None]] = {}
        self._ring: OrderedDict[str, None] = OrderedDict()  # tenants with calls waiting, next first
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __contains__(self, call: CallT) -> bool:
        line = self._lines.get(call.meta.tenant)
        return line is not None and call in line

    def depth(self, tenant: str) -> int:
        line = self._lines.get(tenant)
        return len(line) if line is not None else 0

    def push(self, call: CallT, *, front: bool = False) -> None:
        """Queue `call` at the end of its tenant's line; `front`: first in line and its tenant next
        (a retried call has waited once already)."""
        tenant = call.meta.tenant
        line = self._lines.get(tenant)
        if line is None:
            line = self._lines[tenant] = OrderedDict()
            self._ring[tenant] = None
        line[call] = None
        if front:
            line.move_to_end(call, last=False)
            self._ring.move_to_end(tenant, last=False)
        self.n += 1

    def pop(self) -> CallT:
        """The next tenant's oldest call; that tenant goes to the back of the ring.

        Raises:
            IndexError: nothing waits.
        """
        if not self.n:
            raise IndexError("pop from an empty FairLine")
        tenant = next(iter(self._ring))
        line = self._lines[tenant]
        call, _ = line.popitem(last=False)
        if line:
            self._ring.move_to_end(tenant)
        else:
            del self._lines[tenant], self._ring[tenant]
        self.n -= 1
        return call

    def remove(self, call: CallT) -> bool:
        """Take `call` out of line (cancelled, expired); False if it was not waiting."""
        tenant = call.meta.tenant
        line = self._lines.get(tenant)
        if line is None or call not in line:
            return False
        del line[call]
        if not line:
            del self._lines[tenant], self._ring[tenant]
        self.n -= 1
        return True

    def evict_for(self, tenant: str) -> CallT | None:
        """The line is full and a call of `tenant` arrives: the newest call of the tenant with the
        longest line makes room, if that line is longer than `tenant`'s; None: `tenant`'s is as
        long as any (the newcomer is the one to refuse). O(tenants waiting)."""
        deepest, most = "", self.depth(tenant)
        for name, line in self._lines.items():
            if len(line) > most:
                deepest, most = name, len(line)
        if most == self.depth(tenant):
            return None
        call, _ = self._lines[deepest].popitem(last=True)
        if not self._lines[deepest]:
            del self._lines[deepest], self._ring[deepest]
        self.n -= 1
        return call

    def ahead(self, tenant: str) -> int:
        """About how many waiting calls a new call of `tenant` would wait behind: round-robin serves
        everyone's turn once per round, and this tenant has `depth` rounds to go before its turn."""
        rounds = self.depth(tenant) + 1
        tenants = len(self._ring) + (0 if tenant in self._lines else 1)
        return min(self.n, rounds * tenants - 1)

    def drain(self) -> Iterable[CallT]:
        """Every waiting call, emptying the line."""
        while self.n:
            yield self.pop()


def pick_sync(workers: Iterable[WorkerT], exclude: WorkerT | None = None) -> WorkerT | None:
    """A worker for a sync request: the first pool in POOLS with a free slot, and there the worker
    with the most free slots (ties: the first registered)."""
    best: WorkerT | None = None
    best_rank, most = 3, 0
    for w in workers:
        f = w.free
        if f <= 0 or w is exclude:
            continue
        rank = _RANK.get(w.pool, 1)
        if rank < best_rank or (rank == best_rank and f > most):
            best, best_rank, most = w, rank, f
    return best


def async_free(worker: Slots, lend: bool, reserve: int) -> int:
    """The slots of `worker` an async job may take: all of an async or shared worker's free slots; of
    a sync worker's, none, or (lending) those beyond `reserve`."""
    if worker.pool != "sync":
        return worker.free
    return max(0, worker.free - reserve) if lend else 0


def pick_async(workers: Iterable[WorkerT], lend: bool, reserve: int) -> WorkerT | None:
    """A worker for an async job: the one with the most slots a job may take, or None."""
    best: WorkerT | None = None
    most = 0
    for w in workers:
        f = async_free(w, lend, reserve)
        if f > most:
            best, most = w, f
    return best
