"""Revocation and expiry reach connections that are already open (DESIGN "Auth and tenancy": a revoked
frame client or worker is refused within a second, not at its next connect)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from casola.auth import SCOPE_RUN, SCOPE_WORKER
from casola.client import Client, RequestFailed
from casola.net.errors import ConnectionLost
from casola.worker import Echo, WorkerConfig, WorkerRuntime
from tests.e2e.stack import HttpClient, Stack, run_uvloop


async def _until(cond, timeout: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    """Seconds until `cond()` held."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not cond():
        assert loop.time() - t0 < timeout, "not reached in time"
        await asyncio.sleep(0.005)
    return loop.time() - t0


def test_a_revoked_key_is_refused_on_its_open_frame_connection_within_a_second(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        claims, token = stack.keys.create("acme", [SCOPE_RUN])
        other = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", token)
        try:
            assert (await client.run("echo", b"before")).payload == b"before"
            long = asyncio.ensure_future(client.run("echo", b"x", params={"delay-ms": 3000}))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            stack.keys.revoke(claims.kid)
            with pytest.raises((RequestFailed, ConnectionLost)):
                await long  # the connection ends under its streams
            took = time.monotonic() - t0
            print(f"revocation reached the open frame connection in {took * 1000:.0f} ms")
            assert took < 1.0
            assert client._link.closed.done()
            with pytest.raises((RequestFailed, ConnectionLost)):
                await client.run("echo", b"after")
            assert (await other.run("echo", b"others go on")).payload == b"others go on"
        finally:
            await other.close()
            await stack.stop()

    run_uvloop(main)


def test_a_revoked_worker_is_deregistered_within_a_second(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker(capacity=4)  # a second worker with the shared key stays
        claims, worker_token = stack.keys.create("_workers", [SCOPE_WORKER])
        rt = WorkerRuntime(WorkerConfig(queue=[stack.queue_addr], node_id="revoked-one"), [Echo()], worker_token)
        await rt.start()
        try:
            await stack.wait_workers(2)
            t0 = time.monotonic()
            stack.keys.revoke(claims.kid)
            registry = stack.node.registry
            took = await _until(lambda: all(w.node_id != "revoked-one" for w in registry.workers))
            print(f"revocation reached the registered worker in {took * 1000:.0f} ms")
            assert time.monotonic() - t0 < 1.0
            # It cannot come back: its redial is refused at the handshake.
            await asyncio.sleep(0.3)
            assert all(w.node_id != "revoked-one" for w in registry.workers)
            http = await HttpClient.connect(stack.http_port)
            try:
                r = await http.request("POST", "/v1/run/echo", b"x", {"Authorization": f"Bearer {stack.api_key}"})
                assert r.status == 200  # served by the other worker
            finally:
                await http.close()
        finally:
            await rt.stop()
            await stack.stop()

    run_uvloop(main)


def test_an_expiring_key_ends_its_open_connection(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        claims, token = stack.keys.create("acme", [SCOPE_RUN], ttl_s=1)
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", token)
        try:
            assert (await client.run("echo", b"while valid")).payload == b"while valid"
            await _until(client._link.closed.done, timeout=3)
            late = time.time() - claims.exp
            print(f"expiry reached the open frame connection {late * 1000:.0f} ms after exp")
            assert late < 1.0
        finally:
            await stack.stop()

    run_uvloop(main)
