"""The native async HTTP API through a real deployment on loopback: submit with `X-Casola-Async`,
poll (and long-poll) `/v1/jobs/{id}`, fetch `/v1/jobs/{id}/result`, cancel; idempotency, tenant
isolation, and the routes' refusals."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from casola.auth import SCOPE_RUN
from casola.queue.jobs import JobsConfig
from tests.e2e.stack import HttpClient, Response, Stack, run_uvloop


def jobs_stack(tmp_path: Path, **ingress: Any) -> Stack:
    cfg = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", sweep_interval=0.1)
    return Stack(tmp_path, ingress=ingress or None, queue={"jobs": cfg, "models": ["echo"]})


def _auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _doc(r: Response) -> dict[str, Any]:
    assert r.headers["content-type"] == "application/json", (r.status, r.body)
    doc = json.loads(r.body)
    assert isinstance(doc, dict)
    return doc


async def _submit(http: HttpClient, key: str, body: bytes, **headers: str) -> dict[str, Any]:
    hdrs = _auth(key, **{"X-Casola-Async": "1", "Content-Type": "text/plain", **headers})
    r = await http.request("POST", "/v1/run/echo", body, hdrs)
    assert r.status == 202, r.body
    doc = _doc(r)
    assert r.headers["location"] == doc["status_url"]
    return doc


def test_submit_poll_and_fetch_the_result(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            job = await _submit(http, stack.api_key, b"hello async")
            rid = job["request_id"]
            base = "http://t/v1/jobs/" + rid  # the test client sends Host: t
            urls = (job["status_url"], job["response_url"], job["cancel_url"])
            assert urls == (base, base + "/result", base + "/cancel")
            assert job["model"] == "echo" and job["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")

            r = await http.request("GET", f"/v1/jobs/{rid}?wait_ms=5000", headers=_auth(stack.api_key))
            view = _doc(r)
            assert r.status == 200 and view["status"] == "COMPLETED" and view["error_type"] == ""
            assert r.headers["x-casola-job-status"] == "COMPLETED" and view["status_url"] == base

            r = await http.request("GET", f"/v1/jobs/{rid}/result", headers=_auth(stack.api_key))
            assert (r.status, r.body, r.headers["content-type"]) == (200, b"hello async", "text/plain")

            # Prefer: respond-async (RFC 7240) asks the same
            hdrs = _auth(stack.api_key, Prefer="respond-async")
            r = await http.request("POST", "/v1/run/echo", b"preferred", hdrs)
            assert r.status == 202
            rid2 = _doc(r)["request_id"]
            r = await http.request("GET", f"/v1/jobs/{rid2}/result?wait_ms=5000", headers=_auth(stack.api_key))
            assert (r.status, r.body) == (200, b"preferred")
            # and a request without either stays synchronous
            r = await http.request("POST", "/v1/run/echo", b"sync", _auth(stack.api_key))
            assert (r.status, r.body) == (200, b"sync")

            # a large input streams up (REQUEST + DATA* + END) and comes back whole
            big = bytes(range(256)) * 8192  # 2 MiB
            rid3 = (await _submit(http, stack.api_key, big))["request_id"]
            r = await http.request("GET", f"/v1/jobs/{rid3}/result?wait_ms=10000", headers=_auth(stack.api_key))
            assert r.status == 200 and r.body == big

            assert stack.ingress.in_flight == 0
            counted = stack.ingress.metrics.requests
            assert counted[("echo", 202)] == 3 and counted[("job:result", 200)] == 3
            assert counted[("job:status", 200)] == 1 and counted[("echo", 200)] == 1
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_an_idempotency_key_returns_the_first_job(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        http = await HttpClient.connect(stack.http_port)
        try:
            a = await _submit(http, stack.api_key, b"x", **{"Idempotency-Key": "order-17"})
            b = await _submit(http, stack.api_key, b"x", **{"Idempotency-Key": "order-17"})
            c = await _submit(http, stack.api_key, b"x", **{"Idempotency-Key": "order-18"})
            assert a["request_id"] == b["request_id"] != c["request_id"]
            hdrs = _auth(stack.api_key, **{"X-Casola-Async": "1", "Idempotency-Key": "k" * 256})
            r = await http.request("POST", "/v1/run/echo", b"x", hdrs)
            assert r.status == 400 and json.loads(r.body)["error"]["code"] == "bad_request"
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_another_tenant_sees_no_job_of_mine(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        other = stack.keys.ensure_key("other-key", "other-tenant", [SCOPE_RUN], "tests")
        http = await HttpClient.connect(stack.http_port)
        try:
            rid = (await _submit(http, stack.api_key, b"mine"))["request_id"]
            for method, path in (
                ("GET", f"/v1/jobs/{rid}"),
                ("GET", f"/v1/jobs/{rid}/result"),
                ("POST", f"/v1/jobs/{rid}/cancel"),
                ("DELETE", f"/v1/jobs/{rid}"),
            ):
                r = await http.request(method, path, headers=_auth(other))
                assert r.status == 404, (method, path, r.body)
                err = json.loads(r.body)["error"]
                assert err["code"] == "job_not_found" and r.headers["x-should-retry"] == "false"
            r = await http.request("GET", f"/v1/jobs/{rid}", headers=_auth(stack.api_key))
            assert _doc(r)["status"] == "IN_QUEUE"  # their cancel did nothing
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_cancel_a_queued_job(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()  # no worker: the job stays queued
        http = await HttpClient.connect(stack.http_port)
        try:
            first = await _submit(http, stack.api_key, b"1")
            second = await _submit(http, stack.api_key, b"2")
            assert (first["status"], first["queue_position"]) == ("IN_QUEUE", 0)
            assert (second["status"], second["queue_position"]) == ("IN_QUEUE", 1)
            r = await http.request("GET", f"/v1/jobs/{second['request_id']}/result", headers=_auth(stack.api_key))
            assert r.status == 202 and _doc(r)["status"] == "IN_QUEUE" and r.headers["retry-after"] == "1"

            r = await http.request("POST", f"/v1/jobs/{first['request_id']}/cancel", headers=_auth(stack.api_key))
            view = _doc(r)
            assert r.status == 200 and (view["status"], view["error_type"]) == ("COMPLETED", "cancelled")
            r = await http.request("DELETE", f"/v1/jobs/{second['request_id']}", headers=_auth(stack.api_key))
            assert r.status == 200 and _doc(r)["error_type"] == "cancelled"

            r = await http.request("GET", f"/v1/jobs/{first['request_id']}/result", headers=_auth(stack.api_key))
            err = json.loads(r.body)["error"]
            assert r.status == 400 and (err["type"], err["code"]) == ("cancelled", "cancelled")
            assert r.headers["x-should-retry"] == "false"
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_a_failed_job_answers_its_error(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            rid = (await _submit(http, stack.api_key, b"x", **{"X-Casola-Param-Fail": "bad input"}))["request_id"]
            r = await http.request("GET", f"/v1/jobs/{rid}/result?wait_ms=5000", headers=_auth(stack.api_key))
            err = json.loads(r.body)["error"]
            assert r.status == 400 and err["type"] == "invalid_request_error" and "bad input" in err["message"]
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_a_long_poll_returns_when_the_job_completes(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        http = await HttpClient.connect(stack.http_port)
        try:
            rid = (await _submit(http, stack.api_key, b"later"))["request_id"]
            t0 = time.monotonic()
            poll = asyncio.ensure_future(
                http.request("GET", f"/v1/jobs/{rid}/result?wait_ms=20000", headers=_auth(stack.api_key))
            )
            await asyncio.sleep(0.3)
            assert not poll.done()  # held: the job is still queued
            await stack.add_worker()
            r = await asyncio.wait_for(poll, 10)
            assert (r.status, r.body) == (200, b"later")
            assert time.monotonic() - t0 < 10
            # a wait shorter than the job answers with the job's state when it runs out
            rid = (await _submit(http, stack.api_key, b"slow", **{"X-Casola-Param-Delay-Ms": "3000"}))["request_id"]
            t0 = time.monotonic()
            r = await http.request("GET", f"/v1/jobs/{rid}?wait_ms=200", headers=_auth(stack.api_key))
            assert r.status == 200 and _doc(r)["status"] in ("IN_QUEUE", "IN_PROGRESS")
            assert 0.15 < time.monotonic() - t0 < 2.5
            # a client that leaves during a long poll frees its place
            gone = await HttpClient.connect(stack.http_port)
            await gone.send("GET", f"/v1/jobs/{rid}?wait_ms=20000", headers=_auth(stack.api_key))
            await asyncio.sleep(0.1)
            assert stack.ingress.in_flight == 1
            await gone.close()
            for _ in range(100):
                if stack.ingress.in_flight == 0:
                    break
                await asyncio.sleep(0.02)
            assert stack.ingress.in_flight == 0 and stack.ingress.metrics.requests[("job:status", 499)] == 1
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_unknown_jobs_bad_routes_and_methods(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        http = await HttpClient.connect(stack.http_port)
        key = stack.api_key
        try:
            for path in ("/v1/jobs/no-such-job", "/v1/jobs/bad%20id", "/v1/jobs/", "/v1/jobs/x/result"):
                r = await http.request("GET", path, headers=_auth(key))
                assert r.status == 404 and json.loads(r.body)["error"]["code"] == "job_not_found", path
            for method, path, allow in (
                ("PUT", "/v1/jobs/x", "GET, DELETE"),
                ("POST", "/v1/jobs/x", "GET, DELETE"),
                ("GET", "/v1/jobs/x/cancel", "POST"),
                ("POST", "/v1/jobs/x/result", "GET"),
            ):
                r = await http.request(method, path, headers=_auth(key))
                assert (r.status, r.headers["allow"]) == (405, allow), (method, path)
            r = await http.request("GET", "/v1/jobs/x/other", headers=_auth(key))
            assert r.status == 404 and json.loads(r.body)["error"]["code"] == "not_found"
            r = await http.request("GET", "/v1/jobs/x?wait_ms=soon", headers=_auth(key))
            assert r.status == 400
            r = await http.request("GET", "/v1/jobs/x")  # no key
            assert r.status == 401 and json.loads(r.body)["error"]["type"] == "authentication_error"
            r = await http.request("POST", "/v1/run/echo", b"x", {"X-Casola-Async": "1"})
            assert r.status == 401
            r = await http.request("POST", "/v1/run/no-such-model", b"x", _auth(key, **{"X-Casola-Async": "1"}))
            assert r.status == 404 and json.loads(r.body)["error"]["code"] == "unknown_model"
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_without_auth_jobs_belong_to_the_anonymous_tenant(tmp_path: Path) -> None:
    async def main() -> None:
        stack = jobs_stack(tmp_path)
        await stack.start()
        stack.ingress.verifier = None  # auth off at the edge
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            r = await http.request("POST", "/v1/run/echo", b"anon", {"X-Casola-Async": "1"})
            assert r.status == 202
            rid = _doc(r)["request_id"]
            r = await http.request("GET", f"/v1/jobs/{rid}/result?wait_ms=5000")
            assert (r.status, r.body) == (200, b"anon")
            assert stack.node.jobs is not None
            job = await stack.node.jobs.store.get(rid, "anonymous")
            assert job is not None and job.tenant == "anonymous"
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_max_inflight_sheds_job_operations_too(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path, max_inflight=1, max_inflight_per_tenant=1).start()
        await stack.add_worker()
        busy = await HttpClient.connect(stack.http_port)
        http = await HttpClient.connect(stack.http_port)
        try:
            await busy.send("POST", "/v1/run/echo", b"x", _auth(stack.api_key, **{"X-Casola-Param-Delay-Ms": "2000"}))
            await asyncio.sleep(0.2)  # the tenant's one place is taken
            for method, path, hdrs in (
                ("POST", "/v1/run/echo", {"X-Casola-Async": "1"}),
                ("GET", "/v1/jobs/some-job", {}),
            ):
                r = await http.request(method, path, b"", _auth(stack.api_key, **hdrs))
                assert r.status == 429 and r.headers["x-should-retry"] == "true" and "retry-after" in r.headers
                assert json.loads(r.body)["error"]["code"] == "overloaded"
        finally:
            await http.close()
            await busy.close()
            await stack.stop()

    run_uvloop(main)
