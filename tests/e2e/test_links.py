"""Persistent links: backoff with jitter, workers and ingresses redialling a restarted queue node,
and blocking handlers kept off the event loop."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from casola.net.pool import Backoff
from casola.queue.node import QueueConfig, QueueNode
from casola.wire import Buffer
from casola.worker import BlockingModel, Echo, WorkerConfig, WorkerRuntime
from tests.e2e.stack import HttpClient, Stack, run_uvloop


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    b = Backoff(base=0.1, cap=1.0, rng=random.Random(7))
    delays = [b.next() for _ in range(8)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    b.reset()
    assert b.next() <= 0.1


def test_worker_and_ingress_redial_a_restarted_queue_node(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt, _ = await stack.add_worker()
        port = stack.node.port
        await stack.node.stop()  # the queue node goes away ...
        await asyncio.sleep(0.2)
        node = QueueNode(QueueConfig(listen=f"127.0.0.1:{port}"), stack.keys.verifier())
        await node.start()  # ... and comes back on the same address
        for _ in range(500):
            if node.registry.snapshot().get("echo", {}).get("workers"):
                break
            await asyncio.sleep(0.02)
        assert node.registry.snapshot()["echo"]["workers"] == 1  # the worker re-registered by itself
        await rt.stop()
        await node.stop()
        await stack.ingress.stop()
        await stack.upstream.stop()

    run_uvloop(main)


class SlowSum(BlockingModel):
    """Blocks its thread (as CPU/GPU inference does), streaming one piece per step."""

    name = "slow"

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.steps = 0

    def run(self, body: Buffer, params: Mapping[str, object], cancelled: threading.Event) -> Iterable[Buffer]:
        self.steps = 0
        try:
            for i in range(int(str(params.get("steps", 3)))):
                time.sleep(0.3)
                self.steps += 1
                yield b"%d;" % i
        finally:
            self.closed.set()


def test_blocking_handler_runs_off_the_loop_and_stops_between_pieces(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        slow = SlowSum()
        rt = WorkerRuntime(WorkerConfig(queue=[stack.queue_addr], capacity=4), [slow, Echo()], stack.worker_key)
        await rt.start()
        await rt.wait_registered()
        await stack.wait_workers(1, "slow")
        auth = {"Authorization": f"Bearer {stack.api_key}"}
        a, b = await HttpClient.connect(stack.http_port), await HttpClient.connect(stack.http_port)
        loop = asyncio.get_running_loop()
        long = asyncio.ensure_future(a.request("POST", "/v1/run/slow", b"", {**auth, "X-Casola-Param-Steps": "3"}))
        await asyncio.sleep(0.05)
        t0 = loop.time()
        quick = await b.request("POST", "/v1/run/echo", b"meanwhile", auth)
        assert quick.body == b"meanwhile" and loop.time() - t0 < 0.2  # not stuck behind a 0.3 s blocking step
        r = await long
        assert r.status == 200 and r.body == b"0;1;2;"
        # a cancelled blocking handler stops at the next piece
        await a.send("POST", "/v1/run/slow", b"", {**auth, "X-Casola-Param-Steps": "50"})
        await asyncio.sleep(0.4)
        slow.closed.clear()
        await a.close()
        assert await loop.run_in_executor(None, slow.closed.wait, 5)
        assert slow.steps < 10  # stopped between pieces, not run to the 50th
        await b.close()
        await rt.stop()
        await stack.stop()

    run_uvloop(main)


def test_stop_returns_even_when_a_dial_swallows_the_cancellation() -> None:
    """asyncio.wait_for on 3.11 can return the connection instead of raising CancelledError; stop()
    must still end the redialler and close that late connection, not wait on it forever."""
    from casola.net.pool import Redialer

    class Late:
        def __init__(self) -> None:
            self.closed = asyncio.get_running_loop().create_future()
            self.was_closed = False

        def close(self) -> None:
            self.was_closed = True
            if not self.closed.done():
                self.closed.set_result(None)

    async def main() -> None:
        late: list[Late] = []
        entered = asyncio.Event()

        async def connect() -> Late:
            entered.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # swallowed, as the wait_for race does
            late.append(Late())
            return late[-1]

        r = Redialer(connect, name="t")  # type: ignore[arg-type]
        r.start()
        await entered.wait()
        await asyncio.wait_for(r.stop(), 2)
        assert late and late[0].was_closed and r.link is None

    run_uvloop(main)
