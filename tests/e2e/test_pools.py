"""Capacity pools, queue-jumping, admission and tenant fairness through a real deployment on
loopback (queue node, ingress raw-frame listener, workers over TCP): DESIGN "Capacity pools and
scheduling". Order is asserted from what the workers saw start, never from wall-clock budgets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from casola.auth import SCOPE_RUN, SCOPE_SIGNALS
from casola.client import Client, RequestFailed
from casola.queue.jobs import JobsConfig
from casola.wire import ErrorCode
from casola.worker.call import WorkCall
from casola.worker.model import param_float
from tests.e2e.stack import HttpClient, Stack, run_uvloop


class Recorder:
    """Model `rec`: notes each start (the body, e.g. b"sync-1" or b"job-7"), sleeps `delay-ms`,
    answers the body. `running` / `peak` show how many ran at once on this worker."""

    name = "rec"

    def __init__(self, log: list[str] | None = None) -> None:
        self.log: list[str] = log if log is not None else []
        self.running = self.peak = 0

    async def __call__(self, call: WorkCall) -> None:
        body = await call.body()
        self.log.append(body.decode())
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(param_float(call.params, "delay-ms") / 1000)
        finally:
            self.running -= 1
        call.respond(body, "text/plain")


def pools_stack(tmp_path: Path, **queue: Any) -> Stack:
    jobs = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", sweep_interval=0.05)
    return Stack(tmp_path, queue={"jobs": jobs, "models": ["rec"], **queue})


async def add(stack: Stack, pool: str, capacity: int, rec: Recorder) -> None:
    await stack.add_worker(capacity, pool=pool, extra=[rec])


async def client_for(stack: Stack, tenant: str = "dev") -> Client:
    key = stack.api_key if tenant == "dev" else stack.keys.create(tenant, [SCOPE_RUN])[1]
    return await Client.connect(f"127.0.0.1:{stack.frames_port}", key)


async def until(cond: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


def test_a_sync_request_jumps_a_backlog_of_async_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path).start()
        rec = Recorder()
        await add(stack, "shared", 2, rec)
        client = await client_for(stack)
        try:
            for i in range(40):
                await client.submit("rec", f"job-{i}".encode(), params={"delay-ms": 30})
            await until(lambda: len(rec.log) >= 2)
            started_before = len(rec.log)
            result = await client.run("rec", b"sync-0", params={"delay-ms": 30})
            assert result.payload == b"sync-0"
            # It took the first slot that freed (a claim already in flight may take one more).
            assert rec.log.index("sync-0") <= started_before + 1, rec.log[:8]
            counts = await stack.node.jobs.store.counts()  # type: ignore[union-attr]
            assert counts.get("IN_QUEUE", 0) >= 20  # the backlog is still there
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_jobs_run_on_async_and_shared_capacity_only_sync_takes_its_pool_first(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path).start()
        on_sync, on_async = Recorder(), Recorder()
        await add(stack, "sync", 2, on_sync)
        await add(stack, "async", 2, on_async)
        await stack.wait_workers(2, "rec")
        client = await client_for(stack)
        try:
            ids = [
                (await client.submit("rec", f"job-{i}".encode(), params={"delay-ms": 5})).request_id for i in range(8)
            ]
            for rid in ids:
                view = await client.job(rid, wait_ms=10_000)
                assert view.status == "COMPLETED"
            assert sorted(on_async.log) == sorted(f"job-{i}" for i in range(8)) and on_sync.log == []
            await client.run("rec", b"sync-0")
            assert on_sync.log == ["sync-0"]  # the sync pool first, though the async pool was free
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_sync_borrows_free_async_capacity_when_its_pool_is_full(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path).start()
        on_sync, on_async = Recorder(), Recorder()
        await add(stack, "sync", 1, on_sync)
        await add(stack, "async", 1, on_async)
        await stack.wait_workers(2, "rec")
        client = await client_for(stack)
        try:
            first = asyncio.ensure_future(client.run("rec", b"sync-0", params={"delay-ms": 300}))
            await until(lambda: on_sync.log == ["sync-0"])
            second = await client.run("rec", b"sync-1")
            assert second.payload == b"sync-1" and on_async.log == ["sync-1"]
            await first
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


@pytest.mark.parametrize("lend", [False, True])
def test_idle_sync_capacity_is_lent_to_jobs_only_when_configured(tmp_path: Path, lend: bool) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path, lend_idle_sync=lend, lend_reserve=1).start()
        rec = Recorder()
        await add(stack, "sync", 3, rec)
        client = await client_for(stack)
        try:
            ids = [
                (await client.submit("rec", f"job-{i}".encode(), params={"delay-ms": 300})).request_id for i in range(4)
            ]
            if not lend:
                await asyncio.sleep(0.5)  # ten sweeps: nothing may claim them
                assert rec.log == []
                assert [(await client.job(r)).status for r in ids] == ["IN_QUEUE"] * len(ids)
                assert (await client.run("rec", b"sync-0")).payload == b"sync-0"
                return
            await until(lambda: len(rec.log) >= 2)
            await asyncio.sleep(0.1)  # the pump had its chances: it lends two slots of three, not the reserve
            assert rec.running == 2
            assert (await client.run("rec", b"sync-0")).payload == b"sync-0"  # the reserve, at once
            assert rec.log.index("sync-0") == 2
            for rid in ids:
                assert (await client.job(rid, wait_ms=10_000)).status == "COMPLETED"
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_a_request_that_cannot_start_before_its_deadline_is_refused_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path, deadlines={"rec": 150}).start()
        rec = Recorder()
        await add(stack, "sync", 1, rec)
        client = await client_for(stack)
        try:
            for i in range(3):  # measure the service time (about 100 ms)
                await client.run("rec", f"warm-{i}".encode(), params={"delay-ms": 100}, deadline_ms=5000)
            busy = [
                asyncio.ensure_future(
                    client.run("rec", f"busy-{i}".encode(), params={"delay-ms": 100}, deadline_ms=5000)
                )
                for i in range(3)
            ]
            await until(lambda: "busy-0" in rec.log)
            with pytest.raises(RequestFailed) as err:
                await client.run("rec", b"late", deadline_ms=120)
            # Refused at admission (OVERLOADED, 429, with Retry-After), not left to time out (504).
            assert err.value.code == ErrorCode.OVERLOADED and err.value.retryable
            assert err.value.retry_after_ms >= 1 and "deadline" in err.value.message
            # No deadline of its own: the model's default (150 ms) applies, and is as far out of reach.
            with pytest.raises(RequestFailed) as err:
                await client.run("rec", b"late-default")
            assert err.value.code == ErrorCode.OVERLOADED
            assert "late" not in rec.log and "late-default" not in rec.log
            await asyncio.gather(*busy)
            assert stack.node.stats["deadline_refused"] == 2
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_one_tenants_flood_does_not_starve_another_tenants_sync_traffic(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path).start()
        rec = Recorder()
        await add(stack, "sync", 1, rec)
        flood, other = await client_for(stack, "flood"), await client_for(stack, "other")
        try:
            floods = [
                asyncio.ensure_future(flood.run("rec", f"flood-{i}".encode(), params={"delay-ms": 10}))
                for i in range(40)
            ]
            await until(lambda: len(rec.log) >= 1)
            at = len(rec.log)
            mine = [await other.run("rec", f"other-{i}".encode(), params={"delay-ms": 10}) for i in range(3)]
            assert [m.payload for m in mine] == [b"other-0", b"other-1", b"other-2"]
            for i in range(3):
                # Though 30+ flood requests waited before it, each starts after at most two: the one
                # running when it arrived, and (from the second on) the one that took the slot its
                # previous request freed before it was sent. FIFO would put other-0 at about 40.
                assert rec.log.index(f"other-{i}") <= at + 3 * i + 1, rec.log
            await asyncio.gather(*floods)
        finally:
            await flood.close()
            await other.close()
            await stack.stop()

    run_uvloop(main)


def test_a_tenant_over_its_share_of_the_line_is_refused_others_are_not(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path, max_pending_per_tenant=5).start()
        rec = Recorder()
        await add(stack, "sync", 1, rec)
        flood, other = await client_for(stack, "flood"), await client_for(stack, "other")
        try:
            running = asyncio.ensure_future(flood.run("rec", b"flood-run", params={"delay-ms": 300}))
            await until(lambda: rec.log == ["flood-run"])
            waiting = [asyncio.ensure_future(flood.run("rec", f"flood-{i}".encode())) for i in range(5)]
            await until(lambda: len(stack.node.registry.models["rec"].pending) == 5)
            with pytest.raises(RequestFailed) as err:
                await flood.run("rec", b"flood-over")
            assert err.value.code == ErrorCode.OVERLOADED and "tenant" in err.value.message
            assert (await other.run("rec", b"other-0")).payload == b"other-0"
            await asyncio.gather(running, *waiting)
        finally:
            await flood.close()
            await other.close()
            await stack.stop()

    run_uvloop(main)


def test_async_jobs_of_two_tenants_interleave(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path).start()
        rec = Recorder()
        flood, other = await client_for(stack, "flood"), await client_for(stack, "other")
        try:
            for i in range(30):
                await flood.submit("rec", f"flood-{i}".encode(), params={"delay-ms": 5})
            ids = [
                (await other.submit("rec", f"other-{i}".encode(), params={"delay-ms": 5})).request_id for i in range(3)
            ]
            await add(stack, "async", 1, rec)  # the worker arrives after the backlog built up
            for rid in ids:
                assert (await other.job(rid, wait_ms=10_000)).status == "COMPLETED"
            positions = [rec.log.index(f"other-{i}") for i in range(3)]
            assert positions[-1] <= 6, rec.log[:10]  # interleaved, not behind the 30 flood jobs
        finally:
            await flood.close()
            await other.close()
            await stack.stop()

    run_uvloop(main)


def test_signals_per_model_and_pool_in_the_api_and_metrics(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await pools_stack(tmp_path).start()
        on_sync, on_async = Recorder(), Recorder()
        await add(stack, "sync", 1, on_sync)
        await add(stack, "async", 1, on_async)
        await stack.wait_workers(2, "rec")
        client = await client_for(stack)
        http = await HttpClient.connect(stack.http_port)
        scaler_key = stack.keys.create("ops", [SCOPE_SIGNALS])[1]
        try:
            for i in range(3):
                await client.run("rec", f"warm-{i}".encode(), params={"delay-ms": 20})
            job = await client.submit("rec", b"job-0", params={"delay-ms": 20})
            assert (await client.job(job.request_id, wait_ms=5000)).status == "COMPLETED"
            # Two sync requests beyond both pools' slots: one runs on each pool, two wait.
            long = [
                asyncio.ensure_future(client.run("rec", f"long-{i}".encode(), params={"delay-ms": 400}))
                for i in range(4)
            ]
            await until(lambda: len(stack.node.registry.models["rec"].pending) == 2)

            r = await http.request("GET", "/v1/signals", headers={"Authorization": f"Bearer {scaler_key}"})
            assert r.status == 200, r.body
            (node,) = json.loads(r.body)["nodes"]
            pools = {rec["pool"]: rec for rec in node["pools"] if rec["model"] == "rec"}
            sync, asyn, shared = pools["sync"], pools["async"], pools["shared"]
            assert (sync["arrived"], sync["queue_depth"], sync["busy"], sync["slots"], sync["workers"]) == (
                7,
                2,
                1,
                1,
                1,
            )
            assert sync["arrival_rate"] > 0 and sync["wait"]["count"] >= 5
            assert sync["service"]["count"] == 3 and 0.015 < sync["service"]["sum_s"] / 3 < 0.5
            assert (asyn["arrived"], asyn["busy"], asyn["slots"], asyn["service"]["count"]) == (1, 1, 1, 1)
            assert asyn["wait"]["count"] == 1 and shared["slots"] == 0 and shared["wait"] is None

            r = await http.request("GET", "/v1/signals", headers={"Authorization": f"Bearer {stack.api_key}"})
            assert r.status == 403  # a user key lacks the `signals` scope
            r = await http.request("GET", "/metrics")
            text = r.body.decode()
            assert 'casola_pool_queue_depth{model="rec",pool="sync"} 2.0' in text
            assert 'casola_pool_busy{model="rec",pool="async"} 1.0' in text
            assert 'casola_pool_wait_seconds_count{model="rec",pool="sync"}' in text
            await asyncio.gather(*long)
        finally:
            await http.close()
            await client.close()
            await stack.stop()

    run_uvloop(main)
