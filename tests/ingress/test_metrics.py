"""The ingress's /metrics (casola.ingress.metrics, casola.opsmetrics): the whole request apart from its
stages, buckets that resolve microseconds, the process's own figures, label values only for served
models, and a key with the `metrics` scope where the deployment asks for one. Every scrape is parsed
back with prometheus_client's own parser: the text is written by hand."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from casola.auth import SCOPE_RUN, KeyStore
from casola.auth.tokens import SCOPE_METRICS
from casola.ingress.metrics import UNKNOWN_MODEL, Metrics
from casola.ingress.timing import STAGES as SERVER_TIMING_STAGES
from casola.opsmetrics import Exposition, labels

__all__: list[str] = []

_TIMING = {"queue-overhead": 0.02, "wait": 0.0, "worker-rtt": 0.3, "work": 0.25}  # ms, as the queue node reports


def _families(m: Metrics) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def _samples(m: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples named `name` (any family), keyed by their sorted labels."""
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_the_whole_request_is_its_own_metric_and_not_a_stage() -> None:
    m = Metrics()
    m.observe("echo", 200, 0.0004, _TIMING, 0.03)
    fams = _families(m)
    total = {s.name: s.value for s in fams["casola_request_duration_seconds"].samples}
    assert total["casola_request_duration_seconds_count"] == 1
    assert total["casola_request_duration_seconds_sum"] == pytest.approx(0.0004)
    stages = {s.labels["stage"] for s in fams["casola_stage_seconds"].samples}
    assert stages == set(SERVER_TIMING_STAGES) and "total" not in stages
    # A sum over `stage` counts each stage observation once, never the whole request on top.
    counts = _samples(m, "casola_stage_seconds_count")
    assert sum(counts.values()) == 5  # ingress + the four the queue node reported
    m.observe("echo", 200, 0.9, None, 0.03, upload_ms=850.0)  # a slow client's body
    if "upload" in SERVER_TIMING_STAGES:
        assert _samples(m, "casola_stage_seconds_count")[(("stage", "upload"),)] == 1


def test_a_zero_wait_reads_zero_and_a_20_us_stage_has_a_bucket_of_its_own() -> None:
    m = Metrics()
    m.observe("echo", 200, 0.0004, _TIMING, 0.03)
    buckets = _samples(m, "casola_stage_seconds_bucket")

    def le(stage: str, bound: str) -> float:
        return buckets[(("le", bound), ("stage", stage))]

    assert le("wait", "0.0") == 1  # histogram_quantile answers 0 for it, not half a bucket
    assert le("queue-overhead", "1e-05") == 0 and le("queue-overhead", "2.5e-05") == 1  # 20 µs
    assert le("ingress", "2.5e-05") == 0 and le("ingress", "5e-05") == 1  # 30 µs
    assert le("worker-rtt", "0.00025") == 0 and le("worker-rtt", "0.0005") == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process metrics read /proc")
def test_the_process_reports_memory_cpu_fds_and_gc() -> None:
    fams = _families(Metrics())
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert fams[name].samples[0].value > 0, name
    assert "process_cpu_seconds" in fams and "python_gc_collections" in fams


def test_made_up_models_create_no_series() -> None:
    m = Metrics()
    m.served = {"echo"}  # what `casola up` sets: the queue node's registry.models
    m.observe("echo", 200, 0.001, None, 0.01)
    m.observe("echo", 502, 0.001, None, 0.01)
    for i in range(50):
        m.observe(f"made-up-{i}", 404, 0.001, None, 0.01)
        m.observe(f"made-up-{i}", 499, 0.001, None, 0.01)  # the client left before the answer
    m.observe("job:status", 200, 0.001, None, 0.01)
    assert m.requests == {
        ("echo", 200): 1,
        ("echo", 502): 1,
        (UNKNOWN_MODEL, 404): 50,
        (UNKNOWN_MODEL, 499): 50,
        ("job:status", 200): 1,
    }
    assert {k for k, _ in _samples(m, "casola_requests_total")} == {
        ("model", "echo"),
        ("model", UNKNOWN_MODEL),
        ("model", "job:status"),
    }


def test_a_standalone_ingress_learns_models_from_their_answers() -> None:
    """No queue node in the process: a model is served once it answered 2xx (an unknown one never
    does: the queue node answers 404), or when the configuration names it."""
    m = Metrics()
    m.serve(["asr"])
    m.observe("echo", 503, 0.001, None, 0.01)  # before any success: not known yet
    m.observe("echo", 200, 0.001, None, 0.01)
    m.observe("echo", 503, 0.001, None, 0.01)
    m.observe("asr", 502, 0.001, None, 0.01)
    m.observe("nope", 404, 0.001, None, 0.01)
    assert m.requests == {
        (UNKNOWN_MODEL, 503): 1,
        ("echo", 200): 1,
        ("echo", 503): 1,
        ("asr", 502): 1,
        (UNKNOWN_MODEL, 404): 1,
    }


def test_an_in_process_queue_node_says_which_models_it_serves() -> None:
    m = Metrics()
    m.queue_snapshot = lambda: {"rec": {"workers": 0, "slots": 0, "free": 0, "pending": 0}}
    m.observe("rec", 503, 0.001, None, 0.01)
    m.observe("other", 200, 0.001, None, 0.01)  # the node does not know it: 2xx is not proof here
    assert m.requests == {("rec", 503): 1, (UNKNOWN_MODEL, 200): 1}


def test_the_queue_nodes_families_parse_and_odd_names_are_escaped() -> None:
    m = Metrics()
    odd = 'a"b\\c\nd'
    m.queue_snapshot = lambda: {odd: {"workers": 1, "slots": 2, "free": 2, "pending": 0}}
    m.queue_stats = lambda: {"stats": {"requests": 3, "retries": 1}, "jobs": {"submitted": 2}}
    m.queue_signals = lambda: {"pools": [], "filter": {"stats": {"flagged": 4}}}
    assert _samples(m, "casola_model_slots") == {(("model", odd),): 2}
    assert _samples(m, "casola_queue_requests_total") == {(): 3}
    assert _samples(m, "casola_jobs_submitted_total") == {(): 2}
    assert _samples(m, "casola_filter_verdicts_total") == {(("outcome", "flagged"),): 4}


def test_exposition_writes_numbers_as_prometheus_reads_them() -> None:
    out = Exposition()
    out.gauge("g", "doc", [("", float("inf")), (labels(k="v"), True), (labels(k="w"), 0.1)])
    out.histogram("h", "doc", [("", [("0.0", 0), ("+Inf", 2)], 1.5)])
    fams = {f.name: f for f in text_string_to_metric_families(out.text().decode())}
    assert [s.value for s in fams["g"].samples] == [float("inf"), 1.0, 0.1]
    assert {s.name: s.value for s in fams["h"].samples}["h_count"] == 2


class _Exchange:
    """What `Metrics.respond` uses of an HTTP exchange."""

    def __init__(self, authorization: str | None = None) -> None:
        self._auth = authorization
        self.status = 0
        self.body = b""

    def header(self, name: bytes) -> bytes | None:
        return self._auth.encode() if name == b"authorization" and self._auth is not None else None

    def respond(self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes = b"") -> None:
        self.status, self.body = status, body

    def send_error(self, status: int, message: str, type: str, code: str | None = None, *a: object) -> None:
        self.status, self.body = status, f"{type} {code}: {message}".encode()


def _ask(m: Metrics, verifier: Any, authorization: str | None = None) -> tuple[int, bytes]:
    ex = _Exchange(authorization)
    m.respond(ex, verifier)  # type: ignore[arg-type]
    return ex.status, ex.body


def test_a_key_with_the_metrics_scope_is_required_only_when_asked(tmp_path: Path) -> None:
    ks = KeyStore(tmp_path)
    verifier = ks.verifier()
    _, metrics_key = ks.create("ops", [SCOPE_METRICS])
    _, run_key = ks.create("dev", [SCOPE_RUN])
    m = Metrics()
    assert _ask(m, verifier)[0] == 200  # off by default
    m.require_key = True
    status, body = _ask(m, verifier)
    assert status == 401 and b"missing_api_key" in body
    status, body = _ask(m, verifier, f"Bearer {run_key}")
    assert status == 403 and b"'metrics' scope" in body
    status, body = _ask(m, verifier, f"Bearer {metrics_key}")
    assert status == 200 and b"casola_request_duration_seconds" in body
    assert _ask(m, None)[0] == 200  # auth off (no verifier): nothing to check a key with
