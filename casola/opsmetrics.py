"""Prometheus metrics every role shares, and a small `/metrics` listener for the roles without an ingress.

- `Exposition`: casola's own families written straight as Prometheus text (format 0.0.4).
  prometheus_client's `generate_latest` validates and escapes every name and label of every
  sample (about 7 µs a line here): with ten models (2,300 lines, mostly per-pool histogram
  buckets) a scrape held the event loop for 17 ms; written directly, for 1 ms
  (tests/ingress/test_metrics.py parses the text back with prometheus_client's parser).
- `process_registry()`: prometheus_client's process collectors (Linux /proc: RSS, virtual memory,
  CPU seconds, open and maximum fds, start time; CPython's GC counts; python_info), read at scrape
  time, so nothing is added to any request's path. `render(...)` joins the two.
- `write_queue(...)`: the queue node's gauges and counters (registry, per (model, pool) signals,
  node and job counters, filter verdicts), from the node's own snapshots. The ingress's metrics
  (casola/ingress/metrics.py, `casola up`) and a standalone `casola queue` both use it.
- `write_worker(...)`: a worker runtime's slots, busy slots, cancellations, health and models.
- `serve_metrics(...)`: `GET /metrics` (and nothing else) on HTTP/1.1 for `casola queue` (`[queue]
  metrics`) and `casola worker` (`--metrics`); off unless an address is given.

Label values are what the node serves: the registry's models (configured, or registered by a
worker), pools, fixed counter names; nothing a client can name reaches a label here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest

from casola.auth.tokens import SCOPE_METRICS, AuthError

if TYPE_CHECKING:
    from casola.auth.tokens import Verifier
    from casola.ingress.exchange import Exchange

__all__ = [
    "CONTENT_TYPE",
    "Exposition",
    "Writer",
    "answer_metrics",
    "labels",
    "process_registry",
    "render",
    "serve_metrics",
    "split_address",
    "write_queue",
    "write_worker",
]

CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"

Snapshot = Callable[[], Mapping[str, Any]]
Buckets = Sequence[tuple[str, int]]  # (upper bound as text, cumulative count), "+Inf" last
Series = Iterable[tuple[str, float]]  # (labels() text, value)


# -- the text format ---------------------------------------------------------------------------------


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


def labels(**values: str) -> str:
    """`name="value",...` in the given order, values escaped as the text format says."""
    return ",".join(f'{k}="{_escape(v)}"' for k, v in values.items())


def _num(v: float) -> str:
    """A sample value: `2.0` for 2 as prometheus_client writes it, `+Inf`, `NaN` (floats: repr)."""
    if isinstance(v, int):  # bool too; counts, the common case
        return f"{int(v)}.0"
    if math.isfinite(v):
        return repr(float(v))
    return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")


class Exposition:
    """Families of samples as Prometheus text; one per scrape (`text()` at the end)."""

    __slots__ = ("_out",)

    def __init__(self) -> None:
        self._out: list[str] = []

    def _head(self, name: str, kind: str, doc: str) -> None:
        self._out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")

    def gauge(self, name: str, doc: str, series: Series) -> None:
        self._head(name, "gauge", doc)
        self._samples(name, series)

    def counter(self, name: str, doc: str, series: Series) -> None:
        """`name` without `_total`: the samples get it."""
        self._head(f"{name}_total", "counter", doc)
        self._samples(f"{name}_total", series)

    def _samples(self, name: str, series: Series) -> None:
        out = self._out
        for lbl, v in series:
            out.append(f"{name}{{{lbl}}} {_num(v)}\n" if lbl else f"{name} {_num(v)}\n")

    def histogram(self, name: str, doc: str, series: Iterable[tuple[str, Buckets, float]]) -> None:
        """`series`: (labels() text, cumulative buckets ending with "+Inf", sum)."""
        self._head(name, "histogram", doc)
        out = self._out
        for lbl, buckets, total in series:
            pre = f'{name}_bucket{{{lbl},le="' if lbl else f'{name}_bucket{{le="'
            for bound, n in buckets:
                out.append(f'{pre}{bound}"}} {_num(n)}\n')
            tail = f"{{{lbl}}}" if lbl else ""
            out.append(f"{name}_count{tail} {_num(buckets[-1][1] if buckets else 0)}\n{name}_sum{tail} {_num(total)}\n")

    def text(self) -> bytes:
        return "".join(self._out).encode()


Writer = Callable[[Exposition], None]


def process_registry() -> CollectorRegistry:
    """A fresh registry with the process, GC and platform collectors (not the global REGISTRY:
    in-process tests build several nodes, and each renders only its own)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # Linux only (/proc); elsewhere it renders nothing
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(process: CollectorRegistry, *writers: Writer) -> bytes:
    """One scrape: the process's families, then what each writer writes."""
    out = Exposition()
    for write in writers:
        write(out)
    return generate_latest(process) + out.text()


# -- the queue node ----------------------------------------------------------------------------------


def write_queue(
    out: Exposition, models: Snapshot | None, signals: Snapshot | None, node: Snapshot | None = None
) -> None:
    """The queue node's families.

    Args:
        out: where they go.
        models: `Registry.snapshot` (per model: workers, slots, free, pending), or None.
        signals: `QueueNode.signals` (per (model, pool) records and the filter's counts), or None.
        node: `QueueNode.snapshot` (its `stats` and `jobs` counters), or None.
    """
    if models is not None:
        _model_gauges(out, models())
    if signals is not None:
        _signal_families(out, signals())
    if node is not None:
        _node_counters(out, node())


def _model_gauges(out: Exposition, snap: Mapping[str, Mapping[str, int]]) -> None:
    lbl = {model: labels(model=model) for model in snap}
    for key, doc in (
        ("workers", "Live workers per model"),
        ("slots", "Worker slots per model"),
        ("free", "Free worker slots per model"),
        ("pending", "Requests waiting for a slot, per model"),
    ):
        out.gauge(f"casola_model_{key}", doc, ((lbl[m], facts.get(key, 0)) for m, facts in snap.items()))


def _signal_families(out: Exposition, sig: Mapping[str, Any]) -> None:
    """Per (model, pool) signals (casola.queue.signals) and the content filter's counts."""
    pools = sig.get("pools", [])
    lbl = [labels(model=rec["model"], pool=rec["pool"]) for rec in pools]
    for key, doc in (
        ("arrival_rate", "Arrivals per second (decayed over 10 s), per model and pool"),
        ("queue_depth", "Requests (sync) or jobs (async) waiting, per model and pool"),
        ("slots", "Worker slots, per model and pool"),
        ("busy", "Busy worker slots, per model and pool"),
        ("workers", "Live workers, per model and pool"),
    ):
        out.gauge(f"casola_pool_{key}", doc, ((lbl[i], rec[key]) for i, rec in enumerate(pools)))
    for key, doc in (("wait", "Time waiting for a slot"), ("service", "Time a slot was held")):
        series = ((lbl[i], rec[key]["buckets"], rec[key]["sum_s"]) for i, rec in enumerate(pools) if rec[key])
        out.histogram(f"casola_pool_{key}_seconds", f"{doc}, per model and pool", series)
    flt = sig.get("filter")
    if flt:
        counts = ((labels(outcome=k), n) for k, n in flt["stats"].items())
        out.counter("casola_filter_verdicts", "Content filter outcomes", counts)


def _node_counters(out: Exposition, snap: Mapping[str, Any]) -> None:
    """`casola_queue_<stat>_total` (requests, retries, refusals, worker failures) and
    `casola_jobs_<stat>_total` (async jobs), from counters the node keeps anyway."""
    for prefix, doc, counts in (
        ("casola_queue", "Queue node", snap.get("stats")),
        ("casola_jobs", "Async jobs", snap.get("jobs")),
    ):
        for key, n in (counts or {}).items():
            out.counter(f"{prefix}_{key}", f"{doc}: {key.replace('_', ' ')}", [("", n)])


# -- the worker --------------------------------------------------------------------------------------


def write_worker(out: Exposition, runtime: Any) -> None:
    """A worker runtime's figures, read (never written) at scrape time: `runtime` is a
    `casola.worker.WorkerRuntime` (`config.capacity`, `config.pool`, `config.region`, `node_id`,
    `active`, `cancelled`, `healthy`, `models`)."""
    cfg = runtime.config
    info = labels(node_id=runtime.node_id, pool=cfg.pool, region=cfg.region)
    out.gauge("casola_worker_info", "This worker", [(info, 1)])
    out.gauge("casola_worker_slots", "Requests this worker runs at once", [("", cfg.capacity)])
    out.gauge("casola_worker_busy", "Requests running now", [("", runtime.active)])
    out.gauge("casola_worker_healthy", "1 while it takes new work (not draining or unhealthy)", [("", runtime.healthy)])
    out.counter("casola_worker_cancelled", "Requests the queue node cancelled", [("", runtime.cancelled)])
    out.gauge("casola_worker_model", "Models this worker serves", [(labels(model=m), 1) for m in runtime.models])


# -- GET /metrics ------------------------------------------------------------------------------------


def answer_metrics(ex: Exchange, render: Callable[[], bytes], verifier: Verifier | None, require_key: bool) -> None:
    """Answer one `GET`/`HEAD /metrics` on `ex`: Prometheus text, or 401/403 in the error envelope
    when `require_key` is set and the request has no valid key with the `metrics` scope (with no
    `verifier`, auth is off and nothing is required).

    Raises:
        Nothing: refusals are answered on `ex`.
    """
    if require_key and verifier is not None:
        try:  # the verifier takes the Authorization value itself: `Bearer <token>` or a bare token
            verifier.verify(ex.header(b"authorization"), time.time(), SCOPE_METRICS)
        except AuthError as exc:
            kind = "authentication_error" if exc.status == 401 else "permission_error"
            return ex.send_error(exc.status, exc.message, kind, exc.code)
    ex.respond(200, [(b"content-type", CONTENT_TYPE)], render())


async def serve_metrics(
    scrape: Callable[[], bytes], address: str, verifier: Verifier | None = None, *, require_key: bool = False
) -> asyncio.Server:
    """Listen on `address` (host:port; port 0 picks one) for `GET /metrics`, answered with
    `scrape()`; other paths get 404.

    Raises:
        OSError: the address cannot be bound (socket.gaierror: its host does not resolve).
        ValueError: `address` is not host:port.
    """
    from casola.ingress.http import HttpLimits, serve_http  # late: the worker needs it only with --metrics

    host, port = split_address(address)

    def handle(ex: Exchange) -> None:
        if ex.path != b"/metrics":
            return ex.send_error(404, "only GET /metrics here", "invalid_request_error", "not_found")
        if ex.method not in (b"GET", b"HEAD"):
            return ex.not_allowed(b"GET, HEAD")
        answer_metrics(ex, scrape, verifier, require_key)

    # A scrape is a GET with a few headers and no body: anything bigger is not a Prometheus server.
    limits = HttpLimits(max_head=8192, max_url=1024, max_headers=32, max_body=0)
    return await serve_http(handle, host, port, limits, server_header=b"")


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets or not: the last colon separates the port) as (host, port).

    Raises:
        ValueError: no port, or a port that is not 0..65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)
