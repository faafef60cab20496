"""Prometheus metrics of the ingress process (and of the queue node, in `casola up`).

`casola_request_duration_seconds`: the whole request at the ingress, one observation per request.
`casola_stage_seconds{stage}`: the Server-Timing stages alone (the whole used to be among them as
`stage="total"`, so a sum over `stage` counted every request twice; `work` still lies within
`worker-rtt`, as in Server-Timing). Requests by model and status,
the queue node's registry and signals as gauges (casola.opsmetrics), and the process's own figures
(RSS, CPU, fds, GC), exposed as Prometheus text on `GET /metrics`.

prometheus_client's own Histogram costs about 2 µs per observation (a lock, label lookups); six per
request would be a visible share of the router's budget. So the hot path bumps plain integer
counters (`bisect` + one list increment, about 0.2 µs) and prometheus_client renders them at scrape
time (casola.opsmetrics writes the text; prometheus_client's collectors add the process's figures).

Label values are bounded by what the node serves, never by what clients send: a model is its own
label once the in-process queue node knows it (`served`, `queue_snapshot`), once it is configured
(`serve()`), or once it answered with a 2xx status (only a served model can); anything else counts
under `_unknown`, so a client naming made-up models creates no series.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from typing import TYPE_CHECKING, Any, Final, get_args

from casola.ingress.timing import STAGES as SERVER_TIMING_STAGES
from casola.opsmetrics import CONTENT_TYPE, Exposition, answer_metrics, labels, process_registry, render, write_queue
from casola.stats import FastHistogram
from casola.wire.meta import JobOp

if TYPE_CHECKING:
    from casola.auth.tokens import Verifier
    from casola.ingress.exchange import Exchange

__all__ = ["CONTENT_TYPE", "STAGES", "UNKNOWN_MODEL", "FastHistogram", "Metrics"]

STAGES: Final = SERVER_TIMING_STAGES  # the stage histograms: Server-Timing's, not the whole request
UNKNOWN_MODEL: Final = "_unknown"  # the label of every model this node does not serve

# The ingress measures `upload` and `ingress` itself; the others come from the queue node and worker.
_UPSTREAM_STAGES: Final = tuple(s for s in SERVER_TIMING_STAGES if s not in ("upload", "ingress"))
_STAGE_LABELS: Final = {s: labels(stage=s) for s in STAGES}
# Job operations other than submit are counted as `job:<op>` (casola/ingress/jobs.py): a fixed set.
_JOB_LABELS: Final = frozenset(f"job:{op}" for op in get_args(JobOp) if op)


class Metrics:
    """The ingress's counters; `observe` once per finished request, `render` per scrape.

    Attributes set by the role that runs it (casola/roles.py, tests):
        queue_snapshot, queue_signals, queue_stats: the in-process queue node's `registry.snapshot`,
            `signals` and `snapshot` (`casola up`); None: no queue node in this process.
        served: the model names this node serves, looked up live (`casola up`: the queue node's
            `registry.models`); None: learn them from answers (a standalone `casola ingress`).
        realtime: the workflow engine's realtime turn figures (`casola up` with workflows), or None.
        require_key: `GET /metrics` needs a key with the `metrics` scope (`metrics_key = true`).
    """

    MAX_SERIES = 10_000  # (model, status) pairs kept apart; beyond, "_other" (no unbounded growth)
    MAX_MODELS = 1_000  # models learned from their answers; beyond, UNKNOWN_MODEL

    def __init__(self) -> None:
        self.total = FastHistogram()
        self.stage = {s: FastHistogram() for s in STAGES}
        self.requests: dict[tuple[str, int], int] = {}
        self.in_flight = 0
        self.queue_snapshot: Callable[[], dict[str, dict[str, int]]] | None = None
        self.queue_signals: Callable[[], dict[str, Any]] | None = None  # QueueNode.signals, in `casola up`
        self.queue_stats: Callable[[], dict[str, Any]] | None = None  # QueueNode.snapshot, in `casola up`
        self.served: Container[str] | None = None
        self.realtime: Any = None  # the in-process workflow engine's casola.realtime.timing.TurnStats (`casola up`)
        self.require_key = False
        self._known: set[str] = set(_JOB_LABELS)  # label values already allowed (the hot path's one lookup)
        self.registry = process_registry()  # RSS, CPU, fds, GC: rendered before casola's own families

    def serve(self, models: Iterable[str]) -> None:
        """Count `models` under their own names from now on (the configured ones)."""
        self._known.update(models)

    def observe(
        self,
        model: str,
        status: int,
        total_s: float,
        timing: dict[str, float] | None,
        ingress_ms: float,
        upload_ms: float = 0.0,
    ) -> None:
        """One finished request; `timing` in milliseconds as the queue node reported it, `upload_ms`
        the client's time sending its body (observed when above zero, as Server-Timing shows it)."""
        if model not in self._known:
            model = self._label(model, status)
        key = (model, status)
        requests = self.requests
        if key not in requests and len(requests) >= self.MAX_SERIES:
            key = ("_other", status)
        requests[key] = requests.get(key, 0) + 1
        self.total.observe(total_s)
        stage = self.stage
        stage["ingress"].observe(ingress_ms / 1000)
        if upload_ms > 0 and "upload" in stage:
            stage["upload"].observe(upload_ms / 1000)
        if timing:
            for name in _UPSTREAM_STAGES:
                v = timing.get(name)
                if v is not None and v >= 0:  # negative: not finished (see casola.ingress.timing)
                    stage[name].observe(v / 1000)

    def _label(self, model: str, status: int) -> str:
        """The label of a model not seen yet: its name when this node serves it, else UNKNOWN_MODEL."""
        if self.served is not None:
            served = model in self.served
        elif self.queue_snapshot is not None:  # an in-process node without `served` set (tests)
            served = model in self.queue_snapshot()
        else:  # a standalone ingress: only a model some queue node serves is answered with a 2xx
            served = 200 <= status < 300
        if not served or len(self._known) >= self.MAX_MODELS + len(_JOB_LABELS):
            return UNKNOWN_MODEL
        self._known.add(model)
        return model

    def render(self) -> bytes:
        """The Prometheus text of one scrape."""
        return render(self.registry, self._write)

    def _write(self, out: Exposition) -> None:
        total = self.total
        out.histogram(
            "casola_request_duration_seconds", "Whole requests at the ingress", [("", total.buckets(), total.sum)]
        )
        out.histogram(
            "casola_stage_seconds",
            "Request latency by Server-Timing stage",
            ((_STAGE_LABELS[s], h.buckets(), h.sum) for s, h in self.stage.items()),
        )
        out.counter(
            "casola_requests",
            "Requests by model and HTTP status",
            ((labels(model=model, status=str(status)), n) for (model, status), n in self.requests.items()),
        )
        out.gauge("casola_in_flight", "Requests in progress at the ingress", [("", self.in_flight)])
        write_queue(out, self.queue_snapshot, self.queue_signals, self.queue_stats)
        if self.realtime is not None:
            self.realtime.write(out)

    def respond(self, ex: Exchange, verifier: Verifier | None) -> None:
        """Answer `GET`/`HEAD /metrics` on `ex`: the text, or 401/403 when `require_key` is set and
        the request carries no valid key with the `metrics` scope (`verifier` None: auth is off).

        Call it from `Ingress.handle` in place of `ex.respond(...)`:
        `return self.metrics.respond(ex, self.verifier)`.

        Raises:
            Nothing: refusals are answered on `ex`.
        """
        answer_metrics(ex, self.render, verifier, self.require_key)
