"""The conventions clients, browsers and proxies expect of an HTTP API, end to end over loopback:
`X-Request-Id` on every answer and at the handler, W3C `traceparent`/`tracestate` carried to it,
CORS preflights and headers, 405 with `Allow`, 415 for a body encoding we do not decode, absolute-form
targets, and the listen backlog."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import msgspec
import pytest

from casola.client import Client
from casola.worker import WorkCall
from tests.e2e.stack import HttpClient, Stack, run_uvloop

ORIGIN = "http://app.test:8080"
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MADE_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


class Context:
    """Answers with what the handler was told about the request's identity."""

    name = "context"

    async def __call__(self, call: WorkCall) -> None:
        await call.body()
        doc = {"request_id": call.request_id, "traceparent": call.traceparent, "tracestate": call.tracestate}
        call.respond(msgspec.json.encode(doc), "application/json")


def _auth(stack: Stack, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}", **extra}


def test_every_answer_has_a_request_id_and_the_handler_sees_it(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker(extra=[Context()])
        http = await HttpClient.connect(stack.http_port)
        try:
            answers = [
                await http.request("POST", "/v1/run/echo", b"x", _auth(stack)),
                await http.request("POST", "/v1/run/echo", b"x"),  # 401: no key
                await http.request("GET", "/nowhere"),  # 404
                await http.request("GET", "/healthz"),
                await http.request("POST", "/healthz"),  # 405
                await http.request("GET", "/openai/v1/models", b"", _auth(stack)),
            ]
            ids = [a.headers.get("x-request-id", "") for a in answers]
            assert [a.status for a in answers] == [200, 401, 404, 200, 405, 200]
            assert all(MADE_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids), ids

            mine = "req_2024-01-01T00:00:00.123:abc"
            r = await http.request("POST", "/v1/run/context", b"", _auth(stack, **{"X-Request-Id": mine}))
            assert r.headers["x-request-id"] == mine and json.loads(r.body)["request_id"] == mine
            for bad in ("a b", "x" * 129, "é", "a/b"):
                r = await http.request("POST", "/v1/run/context", b"", _auth(stack, **{"X-Request-Id": bad}))
                made = r.headers["x-request-id"]
                assert MADE_ID.fullmatch(made) and json.loads(r.body)["request_id"] == made
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_trace_context_reaches_the_handler_unless_malformed(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker(extra=[Context()])
        http = await HttpClient.connect(stack.http_port)
        try:
            r = await http.request(
                "POST", "/v1/run/context", b"", _auth(stack, traceparent=PARENT, tracestate="casola=1,rojo=00f0")
            )
            assert json.loads(r.body) | {"request_id": ""} == {
                "request_id": "",
                "traceparent": PARENT,
                "tracestate": "casola=1,rojo=00f0",
            }
            for bad in (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
                PARENT + "-extra",  # version 00 takes no more fields
            ):
                r = await http.request("POST", "/v1/run/context", b"", _auth(stack, traceparent=bad, tracestate="a=1"))
                got = json.loads(r.body)
                assert (got["traceparent"], got["tracestate"]) == ("", ""), bad
            later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"  # a later version may add
            r = await http.request("POST", "/v1/run/context", b"", _auth(stack, traceparent=later))
            assert json.loads(r.body)["traceparent"] == later

            async with await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key) as client:
                res = await client.run("context", request_id="frames-1", traceparent=PARENT, tracestate="k=v")
                assert json.loads(res.payload) == {"request_id": "frames-1", "traceparent": PARENT, "tracestate": "k=v"}
                made = json.loads((await client.run("context", request_id="not ok")).payload)["request_id"]
                assert MADE_ID.fullmatch(made)
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_cors_preflight_and_headers_for_allowed_origins_only(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path, ingress={"cors_origins": [ORIGIN]}).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            asked = "authorization, content-type, x-casola-trace, x-casola-param-chunks, idempotency-key, x-evil"
            pre = await http.request(
                "OPTIONS",
                "/v1/run/echo",
                headers={
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": asked,
                },
            )
            assert pre.status == 204
            assert pre.headers["access-control-allow-origin"] == ORIGIN
            assert "POST" in pre.headers["access-control-allow-methods"]
            granted = {h.strip() for h in pre.headers["access-control-allow-headers"].split(",")}
            assert granted == set(h.strip() for h in asked.split(",")) - {"x-evil"}
            assert int(pre.headers["access-control-max-age"]) > 0

            ok = await http.request(
                "POST", "/v1/run/echo", b"x", _auth(stack, Origin=ORIGIN, **{"X-Casola-Trace": "1"})
            )
            refused = await http.request("POST", "/v1/run/echo", b"x", {"Origin": ORIGIN})  # 401
            for r in (ok, refused):
                assert r.headers["access-control-allow-origin"] == ORIGIN
                assert r.headers["timing-allow-origin"] == ORIGIN
                exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
                assert {"server-timing", "x-request-id", "retry-after"} <= exposed
                assert "origin" in r.headers["vary"].lower()
            assert ok.status == 200 and "server-timing" in ok.headers and refused.status == 401

            other = {"Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST"}
            pre = await http.request("OPTIONS", "/v1/run/echo", headers=other)
            assert pre.status == 403 and "access-control-allow-origin" not in pre.headers
            r = await http.request("POST", "/v1/run/echo", b"x", _auth(stack, Origin="http://elsewhere.test"))
            assert r.status == 200 and "access-control-allow-origin" not in r.headers
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_no_origin_is_allowed_by_default(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        http = await HttpClient.connect(stack.http_port)
        try:
            pre = await http.request(
                "OPTIONS", "/v1/run/echo", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
            )
            assert pre.status == 403 and "access-control-allow-origin" not in pre.headers
            plain = await http.request("OPTIONS", "/v1/run/echo")  # not a preflight
            assert plain.status == 204 and "POST" in plain.headers["allow"]
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_wrong_methods_get_405_with_allow_and_encoded_bodies_415(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            for method, path, allow in (
                ("POST", "/healthz", "GET, HEAD"),
                ("DELETE", "/readyz", "GET, HEAD"),
                ("PUT", "/metrics", "GET, HEAD"),
                ("POST", "/v1/signals", "GET, HEAD"),
                ("GET", "/v1/run/echo", "POST"),
            ):
                r = await http.request(method, path, b"", _auth(stack))
                assert (r.status, r.headers.get("allow")) == (405, allow), (method, path)
                assert json.loads(r.body)["error"]["code"] == "method_not_allowed"
            for path in ("/v1/run/echo", "/openai/v1/chat/completions"):
                r = await http.request("POST", path, b"\x1f\x8b...", _auth(stack, **{"Content-Encoding": "gzip"}))
                assert r.status == 415 and r.headers["accept-encoding"] == "identity", path
                assert json.loads(r.body)["error"]["code"] == "unsupported_content_encoding"
            r = await http.request("POST", "/v1/run/echo", b"plain", _auth(stack, **{"Content-Encoding": "identity"}))
            assert (r.status, r.body) == (200, b"plain")
            r = await http.request("POST", f"http://127.0.0.1:{stack.http_port}/v1/run/echo", b"abs", _auth(stack))
            assert (r.status, r.body) == (200, b"abs")  # absolute-form target (RFC 9112 §3.2.2)
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_listeners_queue_2048_connections_by_default(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        try:
            out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
            backlog = {}
            for line in out.splitlines():  # State Recv-Q Send-Q Local:Port Peer  (Send-Q: the backlog)
                fields = line.split()
                backlog[int(fields[3].rpartition(":")[2])] = int(fields[2])
            assert backlog[stack.http_port] == 2048 and backlog[stack.frames_port] == 2048
        finally:
            await stack.stop()

    run_uvloop(main)


def test_the_access_log_has_one_line_per_request_with_its_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="casola.access")  # what `--access-log` turns on

    async def main() -> list[str]:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            answers = [
                await http.request("POST", "/v1/run/echo", b"x", _auth(stack)),
                await http.request("GET", "/nowhere%0a"),
                await http.request("POST", "/v1/run/echo", b"x"),
            ]
            return [a.headers["x-request-id"] for a in answers]
        finally:
            await http.close()
            await stack.stop()

    ids = run_uvloop(main)
    lines = [r for r in caplog.records if r.name == "casola.access"]
    got = [(r.fields["method"], r.fields["path"], r.fields["status"], r.request_id) for r in lines]  # type: ignore[attr-defined]
    assert got == [
        ("POST", "/v1/run/echo", 200, ids[0]),
        ("GET", "/nowhere%0a", 404, ids[1]),
        ("POST", "/v1/run/echo", 401, ids[2]),
    ]
    assert all("\n" not in r.getMessage() for r in lines)
