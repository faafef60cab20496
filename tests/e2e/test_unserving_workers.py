"""Workers that cannot serve get no work (a worker that sent GOAWAY, or a HEARTBEAT saying it is not
healthy): what waits for them gets NO_CAPACITY at once, and so does what comes next; `/readyz`
tells a load balancer, `/healthz` stays a liveness check."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from casola.client import Client, RequestFailed
from casola.wire import ErrorCode
from tests.e2e.stack import HttpClient, Stack, run_uvloop


async def _get(port: int, path: str) -> tuple[int, dict[str, object]]:
    http = await HttpClient.connect(port)
    try:
        r = await http.request("GET", path)
    finally:
        await http.close()
    return r.status, msgspec.json.decode(r.body)


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["draining", "unhealthy"])
def test_requests_for_a_model_whose_only_worker_cannot_serve_fail_at_once(tmp_path: Path, how: str) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        stack.ingress.required_models = ["echo"]
        rt, _ = await stack.add_worker(capacity=1)
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        try:
            assert (await _get(stack.http_port, "/readyz"))[0] == 200
            running = asyncio.ensure_future(client.run("echo", b"busy", params={"delay-ms": 600}))
            await asyncio.sleep(0.1)
            waiting = asyncio.ensure_future(client.run("echo", b"waits"))  # no deadline: it would wait forever
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            if how == "draining":
                drain = asyncio.ensure_future(rt.drain())
            else:
                rt.healthy = False
            with pytest.raises(RequestFailed) as err:
                await waiting
            assert err.value.code == ErrorCode.NO_CAPACITY and time.monotonic() - t0 < 0.5
            with pytest.raises(RequestFailed) as err:
                await asyncio.wait_for(client.run("echo", b"new"), 0.5)  # at once, not at a deadline
            assert err.value.code == ErrorCode.NO_CAPACITY
            status, body = await _get(stack.http_port, "/readyz")
            assert status == 503 and "model 'echo' has no serving worker" in body["reasons"]  # type: ignore[operator]
            assert (await _get(stack.http_port, "/healthz"))[0] == 200  # alive all the same
            assert (await running).payload == b"busy"  # what it had taken, it finishes
            if how == "draining":
                await drain
            else:
                rt.healthy = True
                await _until(lambda: stack.node.registry.models["echo"].live_workers == 1)
                assert (await client.run("echo", b"back")).payload == b"back"
                assert (await _get(stack.http_port, "/readyz"))[0] == 200
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_readyz_names_what_is_missing(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        stack.ingress.required_models = ["echo"]
        try:
            status, body = await _get(stack.http_port, "/readyz")
            assert (status, body["status"]) == (503, "not_ready")
            assert body["reasons"] == ["model 'echo' has no serving worker"]
            await stack.add_worker()
            assert await _get(stack.http_port, "/readyz") == (200, {"status": "ready", "reasons": []})
            stack.ingress.draining = True
            assert (await _get(stack.http_port, "/readyz"))[1]["reasons"] == ["draining"]
        finally:
            await stack.stop()

    run_uvloop(main)
