"""A workflow's runs are scheduled like any model's requests (a line per tenant, served in turn):
one tenant flooding a workflow past its `max_concurrent` waits behind the others' runs, instead of
taking every slot or making the queue node refuse them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec

from casola.auth import SCOPE_RUN
from casola.client import Client
from casola.flow import Engine, WorkflowConfig
from tests.e2e.stack import Stack, run_uvloop

SLOW = {"max_concurrent": 2, "steps": [{"name": "work", "kind": "model", "model": "echo", "params": {"delay-ms": 200}}]}


def test_one_tenants_flood_does_not_starve_another(tmp_path: Path) -> None:
    async def main() -> tuple[float, int, int]:
        stack = await Stack(tmp_path).start()
        slow = msgspec.convert(SLOW, WorkflowConfig)
        # A second workflow: each one's slots are its own (the engine's are not pooled).
        engine = Engine({"slow": slow, "also-slow": slow}, stack.node.connect_member, "q")
        other_key = stack.keys.ensure_key("other-key", "other", [SCOPE_RUN], "tests")
        try:
            await stack.add_worker(capacity=16)
            await engine.start()
            flooder = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
            other = await Client.connect(f"127.0.0.1:{stack.frames_port}", other_key)
            flood = [asyncio.ensure_future(flooder.run("slow", b"x%d" % i)) for i in range(12)]
            await asyncio.sleep(0.05)  # the flood holds both slots and ten more wait
            t0 = time.monotonic()
            mine = await other.run("slow", b"mine")
            waited = time.monotonic() - t0
            done = await asyncio.gather(*flood, return_exceptions=True)
            await flooder.close()
            await other.close()
            ok = sum(not isinstance(d, BaseException) for d in done)
            return waited, ok, len(mine.payload)
        finally:
            await engine.stop()
            await stack.stop()

    waited, flood_ok, mine = run_uvloop(main)
    assert mine == 4 and flood_ok == 12  # nobody refused: the runs waited in line (not past max_concurrent)
    assert waited < 0.75  # the next free slot (~0.2 s) was the other tenant's turn, not after 10 more runs (1 s+)
