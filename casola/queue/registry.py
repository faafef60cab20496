"""Who can run what: the workers connected to this queue node and the models they serve.

A worker's free slots are its link's send credit (SPEC §7): the worker grants one CREDIT per slot
that frees, so "has a free slot" is `link.conn.send_credit > 0`, kept by the core, never guessed.
Each model keeps a bounded, tenant-fair line of sync requests waiting for a slot (`FairLine`);
bounded, so overload is refused at once (OVERLOADED) instead of buffered. Which worker a request or a
job gets follows its pool (`casola.queue.scheduler`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from casola.net.link import LinkBase
from casola.queue.scheduler import FairLine, pick_sync
from casola.queue.signals import ModelSignals, model_signals

if TYPE_CHECKING:
    from casola.queue.call import Call
    from casola.queue.jobs import RunningJob

__all__ = ["ModelEntry", "Registry", "WorkerEntry"]


class WorkerEntry:
    """One connected worker (one link)."""

    __slots__ = (
        "calls",
        "capacity",
        "healthy",
        "jobs",
        "link",
        "load",
        "models",
        "node_id",
        "pool",
        "region",
        "reserved",
    )

    def __init__(self, link: LinkBase, node_id: str, models: list[str], capacity: int, pool: str, region: str) -> None:
        self.link = link
        self.node_id = node_id
        self.models = models
        self.capacity = capacity
        self.pool = pool or "shared"
        self.region = region
        self.healthy = True
        self.load = 0.0
        self.calls: dict[int, Call] = {}  # worker-side stream id -> call
        self.jobs: dict[int, RunningJob] = {}  # worker-side stream id -> async job
        self.reserved = 0  # slots promised to job claims still in flight

    @property
    def serving(self) -> bool:
        """Takes new work: connected, not draining (its GOAWAY), healthy (its HEARTBEAT)."""
        return self.link.is_up and self.healthy

    @property
    def free(self) -> int:
        return self.link.conn.send_credit - self.reserved if self.serving else 0


class ModelEntry:
    """One model: its workers, its waiting sync requests and its signals."""

    __slots__ = ("name", "pending", "signals", "workers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.workers: list[WorkerEntry] = []
        self.pending = FairLine()  # sync requests waiting for a slot
        self.signals = ModelSignals()

    def pick(self, exclude: WorkerEntry | None = None) -> WorkerEntry | None:
        """A worker for a sync request (sync pool first, then shared, then async), or None."""
        return pick_sync(self.workers, exclude)

    @property
    def slots(self) -> int:
        """Slots of the live workers: what a waiting sync request may get (any pool)."""
        return sum(w.capacity for w in self.workers if w.serving)

    @property
    def live_workers(self) -> int:
        """Workers that take new work (see WorkerEntry.serving)."""
        return sum(1 for w in self.workers if w.serving)


class Registry:
    """Models by name; models named in configuration exist before any worker serves them."""

    def __init__(self, models: list[str] | tuple[str, ...] = ()) -> None:
        self.models: dict[str, ModelEntry] = {m: ModelEntry(m) for m in models}
        self.workers: list[WorkerEntry] = []

    def add(self, worker: WorkerEntry) -> None:
        self.workers.append(worker)
        for m in worker.models:
            entry = self.models.get(m)
            if entry is None:
                entry = self.models[m] = ModelEntry(m)
            entry.workers.append(worker)

    def remove(self, worker: WorkerEntry) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        for m in worker.models:
            entry = self.models.get(m)
            if entry is not None and worker in entry.workers:
                entry.workers.remove(worker)

    def signals(self, now: float) -> list[dict[str, Any]]:
        """Per (model, pool): arrival rate, queue depth, wait and service time, busy slots."""
        return [rec for e in self.models.values() for rec in model_signals(e, now)]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per model: live workers, slots, free slots, waiting requests (for /healthz and signals)."""
        return {
            name: {
                "workers": e.live_workers,
                "slots": sum(w.capacity for w in e.workers),
                "free": sum(w.free for w in e.workers),
                "pending": len(e.pending),
            }
            for name, e in self.models.items()
        }
