"""What the autoscaler reads, per (model, pool) (DESIGN "Capacity pools and scheduling"): arrival
rate, queue depth, wait time, service time, busy slots. This module measures them (`ModelSignals`,
one per model); `casola.queue.registry` assembles the records from it and the model's workers.

The two classes of work queue apart: sync requests in the node's `FairLine`, async jobs in the
store. Their figures (arrivals, depth, wait) are reported under the pool of the same name, because
that is the pool that grows when they pile up. Worker figures (slots, busy, service time) are
reported under the pool the worker registered in; a sync request that borrowed an async slot counts
there. Everything is updated in O(1) on the request's path (a counter, a bucket, a decayed rate)
and assembled only when read.
"""

from __future__ import annotations

from casola.queue.scheduler import POOLS
from casola.stats import DecayingRate, FastHistogram

__all__ = ["ModelSignals"]

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
