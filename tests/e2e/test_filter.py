"""Content filtering racing dispatch, through a real deployment on loopback (DESIGN "Content
filtering off the critical path"): a violation that wins aborts the request in flight (the worker
sees CANCEL, the client `content_policy_violation`, a stream ends with it); a response that wins is
delivered untouched and the late verdict is audited; `block` classifies before dispatch."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from casola.client import Client, RequestFailed
from casola.filter import FilterConfig
from casola.queue.jobs import JobsConfig
from casola.wire import ErrorCode
from casola.worker import Echo
from casola.worker.call import WorkCall
from tests.e2e.stack import HttpClient, Stack, run_uvloop, timing


class Classify:
    """Model `classify`: flags inputs containing b"forbidden", after `delay` seconds."""

    name = "classify"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.seen = 0

    async def __call__(self, call: WorkCall) -> None:
        body = await call.body()
        self.seen += 1
        await asyncio.sleep(self.delay)
        flagged = b"forbidden" in body
        doc = {"flagged": flagged, "label": "forbidden-word" if flagged else "", "score": 0.97 if flagged else 0.02}
        call.respond(json.dumps(doc).encode(), "application/json")


def filter_stack(tmp_path: Path, **filter_cfg: Any) -> Stack:
    jobs = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", sweep_interval=0.05)
    return Stack(tmp_path, queue={"jobs": jobs, "models": ["echo"], "filter": FilterConfig(**filter_cfg)})


async def setup(tmp_path: Path, delay: float = 0.0, **filter_cfg: Any) -> tuple[Stack, Echo, Classify, Client]:
    stack = await filter_stack(tmp_path, **filter_cfg).start()
    classify = Classify(delay)
    _, echo = await stack.add_worker(16, extra=[classify])
    client = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
    return stack, echo, classify, client


def cancels(stack: Stack) -> int:
    """CANCELs the workers received for calls they had (running, or not started yet)."""
    return sum(rt.cancelled for rt in stack.workers)


async def audits(stack: Stack, n: int = 1, timeout: float = 5.0) -> list[Any]:
    store = stack.node.jobs.store  # type: ignore[union-attr]
    end = time.monotonic() + timeout
    while len(found := await store.audits()) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"expected {n} audit records, found {found}")
        await asyncio.sleep(0.02)
    return found


def test_a_violation_that_wins_cancels_the_worker_and_fails_the_request(tmp_path: Path) -> None:
    async def main() -> None:
        stack, echo, classify, client = await setup(tmp_path, 0.01, classifiers=["model"])
        try:
            with pytest.raises(RequestFailed) as err:
                await client.run("echo", b"a forbidden input", params={"delay-ms": 2000})
            assert classify.seen == 1
            assert err.value.code == ErrorCode.CONTENT_POLICY_VIOLATION and not err.value.retryable
            assert "audit id" in err.value.message and "forbidden-word" not in err.value.message
            await asyncio.sleep(0.05)
            assert echo.started == 1 and echo.cancelled == 1 and echo.finished == 0  # the handler saw CANCEL
            assert cancels(stack) == 1
            (rec,) = await audits(stack)
            assert (rec.outcome, rec.flagged, rec.label, rec.classifier) == ("aborted", True, "forbidden-word", "model")
            assert rec.before_response and rec.model == "echo" and rec.tenant == "dev" and rec.policy == "race"
            assert rec.id in err.value.message
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_a_streamed_answer_ends_with_the_violation_and_no_further_byte(tmp_path: Path) -> None:
    async def main() -> None:
        stack, echo, _, client = await setup(tmp_path, 0.15, classifiers=["model"])
        try:
            got: list[bytes] = []
            params = {"chunks": 20, "chunk-delay-ms": 40}
            with pytest.raises(RequestFailed) as err:
                async with client.stream("echo", b"forbidden " * 20, params=params) as s:
                    async for chunk in s:
                        got.append(bytes(chunk))
            assert err.value.code == ErrorCode.CONTENT_POLICY_VIOLATION
            assert 1 <= len(got) < 20  # it had started streaming; it stopped at the verdict
            await asyncio.sleep(0.1)
            assert echo.cancelled == 1 and echo.finished == 0
            (rec,) = await audits(stack)
            assert rec.outcome == "aborted" and rec.before_response
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_a_response_that_wins_is_delivered_and_the_late_verdict_audited(tmp_path: Path) -> None:
    async def main() -> None:
        stack, echo, _, _ = await setup(tmp_path, 0.3, classifiers=["model"])
        http = await HttpClient.connect(stack.http_port)
        try:
            headers = {"Authorization": f"Bearer {stack.api_key}", "X-Casola-Trace": "1"}
            r = await http.request("POST", "/v1/run/echo", b"forbidden but fast", headers)
            assert r.status == 200 and r.body == b"forbidden but fast"  # untouched
            assert 'filter;desc="pending"' in r.headers["server-timing"]
            (rec,) = await audits(stack)
            assert rec.outcome == "late" and rec.flagged and not rec.before_response and rec.filter_ms >= 250
            assert echo.finished == 1 and echo.cancelled == 0
            assert stack.node.filtering.stats["late"] == 1
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_rule_based_race_reports_its_duration_and_aborts_matches(tmp_path: Path) -> None:
    async def main() -> None:
        stack, echo, classify, _ = await setup(tmp_path, terms=["Forbidden"], patterns=[r"\d{3}-\d{2}-\d{4}"])
        http = await HttpClient.connect(stack.http_port)
        try:
            headers = {"Authorization": f"Bearer {stack.api_key}", "X-Casola-Trace": "1"}
            r = await http.request("POST", "/v1/run/echo", b"a clean input", headers)
            assert r.status == 200 and r.body == b"a clean input"
            stages = timing(r.headers["server-timing"])
            assert 0 <= stages["filter"] < stages["worker-rtt"] + 50  # finished, and said so
            r = await http.request(
                "POST", "/v1/run/echo", b"my ssn is 123-45-6789", {**headers, "X-Casola-Param-delay-ms": "500"}
            )
            assert r.status == 400 and json.loads(r.body)["error"]["type"] == "content_policy_violation"
            assert r.headers["x-should-retry"] == "false"
            (rec,) = await audits(stack)
            assert rec.label == r"pattern:\d{3}-\d{2}-\d{4}" and rec.classifier == "rules" and rec.outcome == "aborted"
            await asyncio.sleep(0.05)
            # The rules answer within microseconds: the worker had the request and got its CANCEL
            # at once (usually before the handler had even started).
            assert cancels(stack) == 1 and echo.finished == 1 and classify.seen == 0  # finished: the clean one
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_block_classifies_before_dispatch(tmp_path: Path) -> None:
    async def main() -> None:
        stack, echo, classify, _ = await setup(tmp_path, 0.05, classifiers=["model"], models={"echo": "block"})
        http = await HttpClient.connect(stack.http_port)
        try:
            headers = {"Authorization": f"Bearer {stack.api_key}", "X-Casola-Trace": "1"}
            r = await http.request("POST", "/v1/run/echo", b"forbidden", headers)
            assert r.status == 400 and json.loads(r.body)["error"]["type"] == "content_policy_violation"
            assert echo.started == 0  # never reached the worker
            (rec,) = await audits(stack)
            assert rec.outcome == "blocked" and rec.policy == "block"
            r = await http.request("POST", "/v1/run/echo", b"clean", headers)
            assert r.status == 200 and r.body == b"clean" and echo.started == 1
            stages = timing(r.headers["server-timing"])
            assert stages["filter"] >= 45  # the classifier's full latency, before dispatch
            assert stages["queue-overhead"] < stages["filter"]  # and not counted as the node's overhead
            assert classify.seen == 2
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_an_async_jobs_input_is_classified_before_it_is_stored(tmp_path: Path) -> None:
    async def main() -> None:
        stack, echo, _, client = await setup(tmp_path, terms=["forbidden"])
        try:
            with pytest.raises(RequestFailed) as err:
                await client.submit("echo", b"a forbidden job")
            assert err.value.code == ErrorCode.CONTENT_POLICY_VIOLATION
            assert not any((await stack.node.jobs.store.counts()).values())  # type: ignore[union-attr]
            (rec,) = await audits(stack)
            assert rec.outcome == "blocked" and rec.label == "term:forbidden"
            view = await client.submit("echo", b"a clean job")
            assert (await client.job(view.request_id, wait_ms=5000)).status == "COMPLETED"
            assert echo.finished == 1
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_classifier_failure_follows_on_error(tmp_path: Path) -> None:
    async def main() -> None:
        # No worker serves `classify` here: every classification fails.
        stack = await filter_stack(tmp_path, classifiers=["model"], classify_model="nobody", on_error="block").start()
        _, echo = await stack.add_worker(4)
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        try:
            with pytest.raises(RequestFailed) as err:
                await client.run("echo", b"anything", params={"delay-ms": 1000})
            assert err.value.code == ErrorCode.CONTENT_POLICY_VIOLATION and echo.finished == 0
            (rec,) = await audits(stack)
            assert rec.outcome == "aborted" and "nobody" in rec.detail
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_a_clean_requests_latency_with_the_race_is_not_worse_than_off_beyond_noise(tmp_path: Path) -> None:
    """Interleaved medians with a generous margin; bench/filter.py measures the real figure."""

    async def main() -> None:
        stack = await filter_stack(tmp_path, terms=["forbidden"], models={"raw": "off"}).start()
        await stack.add_worker(4, extra=[_Named("raw")])
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        body = b"x" * 1024
        try:
            lat: dict[str, list[float]] = {"echo": [], "raw": []}
            for i in range(600):
                model = "echo" if i % 2 else "raw"  # same handler; race vs off
                t = time.perf_counter()
                await client.run(model, body)
                lat[model].append(time.perf_counter() - t)
            race, off = statistics.median(lat["echo"][50:]), statistics.median(lat["raw"][50:])
            assert race <= off * 1.5 + 0.0005, (race, off)
            assert stack.node.filtering.stats["classified"] == 300
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


class _Named(Echo):
    """Echo under another model name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
