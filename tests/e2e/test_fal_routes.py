"""fal's queue API on the wire, without fal-client (plain HTTP): the exact documents and statuses,
what a submit stores (path suffix, webhook, idempotency key, priority), and the routes' refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from casola.auth import SCOPE_RUN
from casola.queue.jobs import JobsConfig
from tests.e2e.stack import HttpClient, Response, Stack, run_uvloop


def jobs_stack(tmp_path: Path) -> Stack:
    cfg = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", sweep_interval=0.1)
    # the submit test's webhook points at loopback: allowed here by the operator's list
    return Stack(tmp_path, queue={"jobs": cfg, "models": ["echo", "idle"], "outbound_allow": ["127.0.0.0/8"]})


def _key(key: str) -> dict[str, str]:
    return {"Authorization": f"Key {key}"}


def _json(r: Response) -> dict[str, Any]:
    assert r.headers["content-type"] == "application/json", (r.status, r.body)
    doc = json.loads(r.body)
    assert isinstance(doc, dict)
    return doc


def test_submit_status_result_and_cancel_documents(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        http = await HttpClient.connect(stack.http_port)
        key = _key(stack.api_key)
        try:
            hdrs = {**key, "Content-Type": "application/json", "Idempotency-Key": "i-1", "X-Fal-Queue-Priority": "low"}
            body = b'{"prompt": "hi"}'
            r = await http.request(
                "POST", "/someone/idle/text-to-image?fal_webhook=http%3A%2F%2F127.0.0.1%3A9%2Fhook", body, hdrs
            )
            assert r.status == 200
            sub = _json(r)
            rid = sub["request_id"]
            base = f"http://t/someone/idle/requests/{rid}"
            assert sub == {
                "request_id": rid,
                "status": "IN_QUEUE",
                "response_url": base,
                "status_url": base + "/status",
                "cancel_url": base + "/cancel",
                "queue_position": 0,
            }
            assert r.headers["x-fal-request-id"] == rid
            again = await http.request("POST", "/someone/idle/text-to-image", body, hdrs)
            assert _json(again)["request_id"] == rid  # the idempotency key
            assert stack.node.jobs is not None
            job = await stack.node.jobs.store.get(rid, "dev")
            assert job is not None and job.model == "idle" and job.payload == body
            assert job.content_type == "application/json" and job.params == {"path": "text-to-image"}
            assert (job.webhook_url, job.idempotency_key, job.priority) == ("http://127.0.0.1:9/hook", "i-1", -1)

            r = await http.request("GET", f"/someone/idle/requests/{rid}/status", headers=key)
            doc = _json(r)
            assert r.status == 202 and doc["status"] == "IN_QUEUE" and doc["queue_position"] == 0
            assert doc["logs"] is None and doc["response_url"] == base
            r = await http.request("GET", f"/someone/idle/requests/{rid}/status?logs=1", headers=key)
            assert [log["message"] for log in _json(r)["logs"]] == ["job submitted"]

            r = await http.request("GET", f"/someone/idle/requests/{rid}", headers=key)
            assert (r.status, _json(r)) == (400, {"detail": "Request is still in progress"})

            # Bearer works as well as Key
            bearer = {"Authorization": f"Bearer {stack.api_key}"}
            r = await http.request("PUT", f"/someone/idle/requests/{rid}/cancel", headers=bearer)
            assert (r.status, _json(r)) == (202, {"status": "CANCELLATION_REQUESTED"})
            r = await http.request("PUT", f"/someone/idle/requests/{rid}/cancel", headers=key)
            assert (r.status, _json(r)) == (400, {"status": "ALREADY_COMPLETED"})
            r = await http.request("GET", f"/someone/idle/requests/{rid}/status", headers=key)
            doc = _json(r)
            assert r.status == 200 and (doc["status"], doc["error_type"]) == ("COMPLETED", "cancelled")
            assert doc["metrics"] == {}
            r = await http.request("GET", f"/someone/idle/requests/{rid}", headers=key)
            doc = _json(r)
            assert r.status == 400 and doc["error_type"] == "cancelled" and doc["detail"] == doc["error"]
            assert r.headers["x-fal-error-type"] == "cancelled"
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_a_result_comes_back_with_its_content_type(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        key = _key(stack.api_key)
        try:
            r = await http.request("POST", "/o/echo", b"raw bytes", {**key, "Content-Type": "text/plain"})
            rid = _json(r)["request_id"]
            for _ in range(200):
                r = await http.request("GET", f"/o/echo/requests/{rid}/status", headers=key)
                if r.status == 200:
                    break
            doc = _json(r)
            assert doc["status"] == "COMPLETED" and doc["metrics"]["inference_time"] >= 0 and "error" not in doc
            r = await http.request("GET", f"/o/echo/requests/{rid}", headers=key)
            assert (r.status, r.body, r.headers["content-type"]) == (200, b"raw bytes", "text/plain")
            assert r.headers["x-fal-request-id"] == rid
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_tenants_unknown_ids_and_refused_routes(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        other = _key(stack.keys.ensure_key("other-key", "other-tenant", [SCOPE_RUN], "tests"))
        http = await HttpClient.connect(stack.http_port)
        key = _key(stack.api_key)
        try:
            rid = _json(await http.request("POST", "/o/idle", b"{}", key))["request_id"]
            for method, suffix in (("GET", "/status"), ("GET", ""), ("PUT", "/cancel")):
                r = await http.request(method, f"/o/idle/requests/{rid}{suffix}", headers=other)
                assert r.status == 404 and _json(r)["error_type"] == "not_found_error", (method, suffix)
            r = await http.request("PUT", "/o/idle/requests/nope/cancel", headers=key)
            assert r.status == 404 and _json(r)["status"] == "NOT_FOUND"
            r = await http.request("GET", "/o/idle/requests/bad%20id/status", headers=key)
            assert r.status == 404
            r = await http.request("POST", "/o/no-such-model", b"{}", key)
            assert r.status == 404 and _json(r)["error_type"] == "not_found_error"
            r = await http.request("POST", "/o/echo", b"{}")
            assert r.status == 401 and _json(r)["error_type"] == "authentication_error"

            for method, path, allow in (
                ("POST", f"/o/idle/requests/{rid}", "GET"),
                ("PUT", f"/o/idle/requests/{rid}/status", "GET"),
                ("GET", f"/o/idle/requests/{rid}/cancel", "PUT"),
            ):
                r = await http.request(method, path, headers=key)
                assert (r.status, r.headers["allow"]) == (405, allow), (method, path)
            for method, path in (
                ("GET", "/o/echo"),  # only POST submits
                ("GET", "/o/idle/requests"),
                ("GET", f"/o/idle/requests/{rid}/status/stream"),  # SSE: not implemented
                ("POST", "/v1/other/thing"),  # casola's own namespaces never reach fal
                ("POST", "/openai/v1/images/generations"),  # not served by the OpenAI surface
                ("GET", "/.well-known/thing/x"),
                ("POST", "/o//x"),
                ("GET", "/single"),
            ):
                r = await http.request(method, path, headers=key)
                assert r.status == 404 and json.loads(r.body)["error"]["code"] == "not_found", (method, path)
            r = await http.request("GET", f"/o/idle/requests/{rid}/status", headers=key)
            assert _json(r)["status"] == "IN_QUEUE"  # nothing above touched it
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)
