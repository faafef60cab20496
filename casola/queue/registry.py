"""Who can run what: the workers connected to this queue node and the models they serve (their
records are `casola.queue.records`), and what operators and the autoscaler read of them: per model
live workers, slots and waiting requests (`snapshot`), per (model, pool) the signals (`signals`).

Each model's line of waiting sync requests is bounded, so overload is refused at once (OVERLOADED)
instead of buffered. Which worker a request or a job gets follows its pool (`casola.queue.scheduler`).
"""

from __future__ import annotations

from typing import Any

from casola.queue.records import ModelEntry, WorkerEntry
from casola.queue.scheduler import POOLS
from casola.stats import FastHistogram

__all__ = ["Registry", "model_signals"]


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


def _hist(h: FastHistogram) -> dict[str, Any]:
    return {
        "count": h.count,
        "sum_s": round(h.sum, 6),
        "p50_le_s": h.quantile(0.5),
        "p99_le_s": h.quantile(0.99),
        "buckets": h.buckets(),
    }


def model_signals(entry: ModelEntry, now: float) -> list[dict[str, Any]]:
    """The model's signals, one record per pool (sync, shared, async)."""
    sig = entry.signals
    slots = dict.fromkeys(POOLS, 0)
    busy = dict.fromkeys(POOLS, 0)
    workers = dict.fromkeys(POOLS, 0)
    for w in entry.workers:
        if not (w.link.is_up and w.healthy):
            continue
        pool = w.pool  # validated in HELLO; "" registers as shared
        workers[pool] += 1
        slots[pool] += w.capacity
        busy[pool] += sum(1 for c in w.calls.values() if c.model is entry)
        busy[pool] += sum(1 for j in w.jobs.values() if j.model == entry.name)
    out = []
    for pool in POOLS:
        rec: dict[str, Any] = {
            "model": entry.name,
            "pool": pool,
            "workers": workers[pool],
            "slots": slots[pool],
            "busy": busy[pool],
            "service": _hist(sig.service[pool]),
        }
        if pool in sig.arrivals:
            rec["arrival_rate"] = round(sig.arrivals[pool].rate(now), 3)
            rec["arrived"] = sig.arrived[pool]
            rec["queue_depth"] = len(entry.pending) if pool == "sync" else sig.async_depth
            rec["wait"] = _hist(sig.wait[pool])
        else:  # shared capacity has no queue of its own
            rec["arrival_rate"], rec["arrived"], rec["queue_depth"], rec["wait"] = 0.0, 0, 0, None
        out.append(rec)
    return out
