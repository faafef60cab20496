"""One tenant's flood must not refuse everyone (DESIGN "Auth and tenancy": admission is per tenant and
per key; overload gets a fast 429 with a truthful Retry-After; no shared link or credit window is a
global choke point).

Three tenants send about 10 times what a model can serve; a fourth, idle tenant keeps asking the
same model, and another model, for one request at a time. `bench/isolation.py` runs the same for a
minute and reports the figures; this is its short form."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from casola.auth import SCOPE_RUN
from casola.client import Client, RequestFailed
from casola.wire import ErrorCode, error_name
from casola.worker import Steps, WorkerConfig, WorkerRuntime
from tests.e2e.stack import HttpClient, Stack, run_uvloop

CAPACITY = 8
SERVICE_MS = 250  # 8 slots x 4/s: the model serves 32 requests a second
FLOOD_RATE = 300  # requests per second per flooding tenant (3 of them: ~28x the model)
SECONDS = 6.0


async def _flood(frames_port: int, key: str, stop: float, statuses: Counter[str], retry_afters: list[int]) -> None:
    """Open loop at FLOOD_RATE over raw frames (4 connections, up to 1,024 streams in flight): a
    request every 1/FLOOD_RATE s, whatever became of the earlier ones."""
    clients = [await Client.connect(f"127.0.0.1:{frames_port}", key) for _ in range(4)]

    async def one(c: Client) -> None:
        try:
            await c.run("echo", b"flood", params={"delay-ms": SERVICE_MS})
            statuses["ok"] += 1
        except RequestFailed as exc:
            statuses[error_name(exc.code)] += 1
            if exc.code == ErrorCode.OVERLOADED:
                retry_afters.append(exc.retry_after_ms)

    tasks = []
    t, i = time.monotonic(), 0
    while t < stop:
        tasks.append(asyncio.ensure_future(one(clients[i % len(clients)])))
        i += 1
        t += 1 / FLOOD_RATE
        await asyncio.sleep(max(0.0, t - time.monotonic()))
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()


async def _idle(port: int, key: str, path: str, headers: dict[str, str], stop: float) -> Counter[int]:
    """One request at a time, as a person using an app would."""
    out: Counter[int] = Counter()
    c = await HttpClient.connect(port)
    try:
        while time.monotonic() < stop:
            r = await c.request("POST", path, b"idle", {"Authorization": f"Bearer {key}", **headers})
            out[r.status] += 1
            await asyncio.sleep(0.05)
    finally:
        await c.close()
    return out


def test_an_idle_tenant_is_served_while_three_others_flood_one_model(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path, queue={"sync_wait_ms": 2000}).start()
        await stack.add_worker(capacity=CAPACITY)  # echo
        steps = WorkerRuntime(WorkerConfig(queue=[stack.queue_addr], capacity=4), [Steps()], stack.worker_key)
        await steps.start()  # another model, on a worker of its own
        await stack.wait_workers(1, "steps")
        flooders = [stack.keys.ensure_key(f"flood-{i}", f"flood-{i}", [SCOPE_RUN], "tests") for i in range(3)]
        idle_key = stack.keys.ensure_key("idle-key", "idle", [SCOPE_RUN], "tests")
        statuses: Counter[str] = Counter()
        retry_afters: list[int] = []
        try:
            stop = time.monotonic() + SECONDS
            floods = [_flood(stack.frames_port, k, stop, statuses, retry_afters) for k in flooders]
            echo_params = {"X-Casola-Param-Delay-Ms": str(SERVICE_MS)}
            steps_params = {"X-Casola-Param-Steps": "1", "X-Casola-Param-Step-Ms": "20"}
            same = _idle(stack.http_port, idle_key, "/v1/run/echo", echo_params, stop)
            other = _idle(stack.http_port, idle_key, "/v1/run/steps", steps_params, stop)
            *_, same_model, other_model = await asyncio.gather(*floods, same, other)
        finally:
            await steps.stop()
            await stack.stop()
        print(
            f"flooders: {dict(statuses)}; idle tenant, same model: {dict(same_model)}, other model: {dict(other_model)}"
        )
        assert set(statuses) <= {"ok", "OVERLOADED"}, statuses  # refused fast (429) and retryable, never 503
        assert statuses["OVERLOADED"] > statuses["ok"]  # the flood really was one
        assert all(ms >= 1 for ms in retry_afters)  # each with its Retry-After
        assert set(same_model) == {200} and same_model[200] >= 8, same_model
        assert set(other_model) == {200} and other_model[200] >= 20, other_model

    run_uvloop(main, timeout=60)
