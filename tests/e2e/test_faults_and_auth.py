"""Worker processes killed mid-request, draining on SIGTERM, and local auth on every surface."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from casola.auth import SCOPE_RUN, SCOPE_WORKER, Claims, sign_token
from casola.client import Client
from casola.net.handshake import Refused, dial_tcp
from casola.wire import ErrorCode, HelloMeta
from tests.e2e.stack import HttpClient, Stack, run_uvloop


def _auth(stack: Stack, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}", **extra}


def test_sigkilled_worker_yields_502_should_retry_then_next_request_succeeds(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        a = stack.spawn_worker("worker-a")
        await stack.wait_workers(1)
        http = await HttpClient.connect(stack.http_port)
        try:
            # head-first: the worker has answered (no retry allowed) but sent no byte yet.
            slow = _auth(stack, **{"X-Casola-Param-Head-First": "1", "X-Casola-Param-Delay-Ms": "10000"})
            await http.send("POST", "/v1/run/echo", b"x", slow)
            while stack.node.registry.snapshot()["echo"]["free"] == 8:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            stack.spawn_worker("worker-b")
            await stack.wait_workers(2)
            a.send_signal(signal.SIGKILL)
            r = await http.read_response()
            assert r.status == 502
            assert r.headers["x-should-retry"] == "true"
            err = json.loads(r.body)["error"]
            assert err["type"] == "worker_error"
            again = await http.request("POST", "/v1/run/echo", b"next", _auth(stack))
            assert (again.status, again.body) == (200, b"next")
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_sigkill_mid_stream_truncates_the_answer(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        a = stack.spawn_worker("worker-a")
        await stack.wait_workers(1)
        http = await HttpClient.connect(stack.http_port)
        try:
            hdrs = _auth(stack, **{"X-Casola-Param-Chunks": "3", "X-Casola-Param-Chunk-Delay-Ms": "3000"})
            await http.send("POST", "/v1/run/echo", b"abc", hdrs)
            line = await http.reader.readline()
            assert line.startswith(b"HTTP/1.1 200")
            a.send_signal(signal.SIGKILL)
            rest = await asyncio.wait_for(http.reader.read(), 10)  # the server closes: no final chunk
            assert b"\r\n0\r\n" not in rest
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_sigterm_drains_in_flight_work_and_takes_nothing_new(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        a = stack.spawn_worker("worker-a")
        await stack.wait_workers(1)
        clients = [await HttpClient.connect(stack.http_port) for _ in range(2)]
        try:
            slow = _auth(stack, **{"X-Casola-Param-Delay-Ms": "600"})
            pending = asyncio.ensure_future(clients[0].request("POST", "/v1/run/echo", b"in flight", slow))
            while stack.node.registry.snapshot()["echo"]["free"] == 8:
                await asyncio.sleep(0.01)
            a.send_signal(signal.SIGTERM)
            r = await pending
            assert (r.status, r.body) == (200, b"in flight")  # finished, not dropped
            assert await asyncio.get_running_loop().run_in_executor(None, a.wait, 10) == 0
            r2 = await clients[1].request("POST", "/v1/run/echo", b"x", _auth(stack))
            assert r2.status == 503  # its only worker is gone: no capacity, retry later
        finally:
            for c in clients:
                await c.close()
            await stack.stop()

    run_uvloop(main)


def test_api_key_cases_on_http(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        ks = stack.keys
        _, expired = ks.create("dev", [SCOPE_RUN], ttl_s=1)
        _, revoked_tok = ks.create("dev", [SCOPE_RUN])
        worker_key = stack.worker_key
        http = await HttpClient.connect(stack.http_port)
        try:
            cases = {
                None: (401, "missing_api_key"),
                "Bearer csk_garbage.sig": (401, "invalid_api_key"),
                f"Bearer {worker_key}": (403, "insufficient_scope"),  # a worker key cannot submit
            }
            for value, (status, code) in cases.items():
                r = await http.request("POST", "/v1/run/echo", b"x", {"Authorization": value} if value else {})
                assert r.status == status and json.loads(r.body)["error"]["code"] == code
            # expiry and revocation, verified locally
            time.sleep(1.05)
            r = await http.request("POST", "/v1/run/echo", b"x", {"Authorization": f"Bearer {expired}"})
            assert r.status == 401 and json.loads(r.body)["error"]["code"] == "expired_api_key"
            r = await http.request("POST", "/v1/run/echo", b"x", {"Authorization": f"Bearer {revoked_tok}"})
            assert r.status == 200
            ks.revoke(ks.verifier().verify(revoked_tok, time.time(), SCOPE_RUN).kid)
            await asyncio.sleep(1.1)  # the ingress re-reads the revocation list at most once a second
            r = await http.request("POST", "/v1/run/echo", b"x", {"Authorization": f"Bearer {revoked_tok}"})
            assert r.status == 401 and json.loads(r.body)["error"]["code"] == "revoked_api_key"
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_roles_are_enforced_at_the_handshake(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        try:
            host, port = "127.0.0.1", stack.node.port
            hello = HelloMeta("worker", credential=stack.api_key, models=["echo"], credit=1)
            with pytest.raises(Refused) as info:  # a user key cannot register a worker
                await dial_tcp(host, port, hello, lambda *a: None)
            assert info.value.code == ErrorCode.FORBIDDEN_ROLE
            forged = sign_token(_other_key(), Claims("k_x", "evil", (SCOPE_WORKER,)))
            with pytest.raises(Refused) as info:
                await dial_tcp(host, port, HelloMeta("worker", credential=forged, models=["echo"]), lambda *a: None)
            assert info.value.code == ErrorCode.UNAUTHENTICATED
            with pytest.raises(Refused) as info:  # a worker key cannot submit on the raw-frame surface
                await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.worker_key)
            assert info.value.code == ErrorCode.FORBIDDEN_ROLE
            with pytest.raises(Refused) as info:
                await Client.connect(f"127.0.0.1:{stack.frames_port}", "")
            assert info.value.code == ErrorCode.UNAUTHENTICATED
        finally:
            await stack.stop()

    run_uvloop(main)


def _other_key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()
