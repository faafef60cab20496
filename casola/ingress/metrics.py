"""Prometheus metrics of the ingress process (and of the queue node, in `casola up`).

Per-stage latency histograms (the Server-Timing stages plus `total`), requests by model and status,
and the queue node's registry as gauges, exposed as Prometheus text on `GET /metrics`.

prometheus_client's own Histogram costs about 2 µs per observation (a lock, label lookups); six per
request would be a visible share of the router's budget. So the hot path bumps plain integer
counters (`bisect` + one list increment, about 0.2 µs) and prometheus_client renders them at scrape
time through a collector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from casola.ingress.timing import STAGES as SERVER_TIMING_STAGES
from casola.stats import FastHistogram

__all__ = ["CONTENT_TYPE", "STAGES", "FastHistogram", "Metrics"]

CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"

STAGES: Final = ("total", *SERVER_TIMING_STAGES)  # the Server-Timing stages, plus the whole request


_UPSTREAM_STAGES: Final = SERVER_TIMING_STAGES[1:]  # reported by the queue node and worker


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Any]:
        m = self._m
        h = HistogramMetricFamily("casola_stage_seconds", "Request latency by stage", labels=["stage"])
        for stage, hist in m.stage.items():
            h.add_metric([stage], hist.buckets(), hist.sum)
        yield h
        c = CounterMetricFamily("casola_requests", "Requests by model and HTTP status", labels=["model", "status"])
        for (model, status), n in m.requests.items():
            c.add_metric([model, str(status)], n)
        yield c
        yield GaugeMetricFamily("casola_in_flight", "Requests in progress at the ingress", value=m.in_flight)
        if m.queue_snapshot is not None:
            yield from _queue_gauges(m.queue_snapshot())
        if m.queue_signals is not None:
            yield from _signal_metrics(m.queue_signals())


def _queue_gauges(snap: dict[str, dict[str, int]]) -> Iterator[Any]:
    for key, doc in (
        ("workers", "Live workers per model"),
        ("slots", "Worker slots per model"),
        ("free", "Free worker slots per model"),
        ("pending", "Requests waiting for a slot, per model"),
    ):
        g = GaugeMetricFamily(f"casola_model_{key}", doc, labels=["model"])
        for model, facts in snap.items():
            g.add_metric([model], facts.get(key, 0))
        yield g


def _signal_metrics(sig: dict[str, Any]) -> Iterator[Any]:
    """The queue node's per (model, pool) signals (casola.queue.signals) and its filter's counts."""
    pools = sig.get("pools", [])
    labels = ["model", "pool"]
    for key, doc in (
        ("arrival_rate", "Arrivals per second (decayed over 10 s), per model and pool"),
        ("queue_depth", "Requests (sync) or jobs (async) waiting, per model and pool"),
        ("slots", "Worker slots, per model and pool"),
        ("busy", "Busy worker slots, per model and pool"),
        ("workers", "Live workers, per model and pool"),
    ):
        g = GaugeMetricFamily(f"casola_pool_{key}", doc, labels=labels)
        for rec in pools:
            g.add_metric([rec["model"], rec["pool"]], rec[key])
        yield g
    for key, doc in (("wait", "Time waiting for a slot"), ("service", "Time a slot was held")):
        h = HistogramMetricFamily(f"casola_pool_{key}_seconds", f"{doc}, per model and pool", labels=labels)
        for rec in pools:
            if rec[key] is not None:
                h.add_metric([rec["model"], rec["pool"]], rec[key]["buckets"], rec[key]["sum_s"])
        yield h
    flt = sig.get("filter")
    if flt:
        c = CounterMetricFamily("casola_filter_verdicts", "Content filter outcomes", labels=["outcome"])
        for outcome, n in flt["stats"].items():
            c.add_metric([outcome], n)
        yield c


class Metrics:
    MAX_SERIES = 10_000  # (model, status) pairs kept apart; beyond, "_other" (no unbounded growth)

    def __init__(self) -> None:
        self.stage = {s: FastHistogram() for s in STAGES}
        self.requests: dict[tuple[str, int], int] = {}
        self.in_flight = 0
        self.queue_snapshot: Callable[[], dict[str, dict[str, int]]] | None = None
        self.queue_signals: Callable[[], dict[str, Any]] | None = None  # QueueNode.signals, in `casola up`
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def observe(
        self, model: str, status: int, total_s: float, timing: dict[str, float] | None, ingress_ms: float
    ) -> None:
        """One finished request; `timing` in milliseconds as the queue node reported it."""
        key = (model, status)
        requests = self.requests
        if key not in requests and len(requests) >= self.MAX_SERIES:
            key = ("_other", status)
        requests[key] = requests.get(key, 0) + 1
        stage = self.stage
        stage["total"].observe(total_s)
        stage["ingress"].observe(ingress_ms / 1000)
        if timing:
            for name in _UPSTREAM_STAGES:
                v = timing.get(name)
                if v is not None and v >= 0:  # negative: not finished (see casola.ingress.timing)
                    stage[name].observe(v / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
