"""What the autoscaler reads, per (model, pool) (DESIGN "Capacity pools and scheduling"): arrival
rate, queue depth, wait time, service time, busy slots.

The two classes of work queue apart: sync requests in the node's `FairLine`, async jobs in the
store. Their figures (arrivals, depth, wait) are reported under the pool of the same name, because
that is the pool that grows when they pile up. Worker figures (slots, busy, service time) are
reported under the pool the worker registered in; a sync request that borrowed an async slot counts
there. Everything is updated in O(1) on the request's path (a counter, a bucket, a decayed rate)
and assembled only when read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from casola.queue.scheduler import POOLS
from casola.stats import DecayingRate, FastHistogram

if TYPE_CHECKING:
    from casola.queue.registry import ModelEntry

__all__ = ["ModelSignals", "model_signals"]

_SERVICE_EWMA = 0.1  # weight of the newest service time in the mean used for admission


class ModelSignals:
    """One model's measurements (the registry's `ModelEntry.signals`)."""

    __slots__ = ("arrivals", "arrived", "async_depth", "served", "service", "service_mean", "wait")

    def __init__(self) -> None:
        self.arrivals = {"sync": DecayingRate(), "async": DecayingRate()}
        self.arrived = {"sync": 0, "async": 0}
        self.wait = {"sync": FastHistogram(), "async": FastHistogram()}
        self.service = {p: FastHistogram() for p in POOLS}
        self.served = dict.fromkeys(POOLS, 0)
        self.service_mean = 0.0  # seconds, EWMA over every pool (what a slot takes to free)
        self.async_depth = 0  # QUEUED jobs, as the store last counted them

    def arrival(self, cls: str, now: float) -> None:
        self.arrivals[cls].add(now)
        self.arrived[cls] += 1

    def started(self, cls: str, waited: float) -> None:
        self.wait[cls].observe(waited)

    def finished(self, pool: str, service: float) -> None:
        hist = self.service.get(pool)
        if hist is None:
            return
        hist.observe(service)
        self.served[pool] += 1
        m = self.service_mean
        self.service_mean = service if m == 0.0 else m + _SERVICE_EWMA * (service - m)

    def wait_estimate(self, ahead: int, slots: int) -> float | None:
        """Seconds until a request with `ahead` requests before it starts, from the measured drain
        rate (slots / mean service time); None until a service time has been measured."""
        if self.service_mean <= 0.0 or slots <= 0:
            return None
        return (ahead + 1) * self.service_mean / slots


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
