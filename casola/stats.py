"""Cheap measurements for hot paths: a histogram that only increments a bucket, and an event rate
that decays exponentially. Both cost well under a microsecond per observation, so the queue node
and the ingress keep them per request without a lock or a label lookup; renderers (Prometheus
collectors, the signals API) read them at scrape time.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Final

__all__ = ["BUCKETS", "DecayingRate", "FastHistogram"]

# 0, then 5 µs .. 60 s in 1-2.5-5 steps: a router's stages take 5-50 µs (a lowest bound of 50 µs
# made Prometheus interpolate a 0 µs wait to 25 µs), models take seconds, a long LLM answer a minute.
# The 0 bucket holds the stages that took no time at all (no wait): histogram_quantile returns 0
# for them instead of half the first bound. 23 bounds cost one more bisect step than 16 and about
# 1 µs per histogram per scrape.
BUCKETS: Final = (
    0.0, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class FastHistogram:
    """Cumulative-at-render histogram: `observe` only finds a bucket and increments it."""

    __slots__ = ("_le", "bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self._le = (*map(str, bounds), "+Inf")  # the `le` label values, made once
        self.counts = [0] * (len(bounds) + 1)  # last slot: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, cumulative count), "+Inf" last."""
        out, acc = [], 0
        for bound, n in zip(self._le, self.counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out

    def quantile(self, q: float) -> float:
        """An upper bound of the q-quantile (the bucket bound it falls in); 0.0 when empty."""
        if not self.count:
            return 0.0
        rank = q * self.count
        acc = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            if acc >= rank:
                return bound
        return math.inf


class DecayingRate:
    """Events per second, exponentially weighted over `tau` seconds: each event adds 1/tau to a value
    that decays as exp(-dt/tau). Reading it at time `now` decays it first. O(1), no window to keep."""

    __slots__ = ("_at", "_v", "tau")

    def __init__(self, tau: float = 10.0) -> None:
        self.tau = tau
        self._v = 0.0
        self._at = 0.0

    def add(self, now: float, n: float = 1.0) -> None:
        dt = now - self._at
        if dt > 0:
            self._v *= math.exp(-dt / self.tau)
            self._at = now
        self._v += n / self.tau

    def rate(self, now: float) -> float:
        dt = now - self._at
        return self._v * math.exp(-dt / self.tau) if dt > 0 else self._v
