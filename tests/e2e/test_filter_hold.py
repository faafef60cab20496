"""The `hold` filter policy (docs/filtering.md): the request is dispatched at once, racing its
classification, and no byte of its answer leaves the queue node before a clean verdict. Here the
verdict comes 200 ms after the worker has answered in full: clean, the answer arrives whole and
only then; violating, the client gets content_policy_violation and not one byte of the answer,
where `race` would have delivered it (the late verdict only recorded)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from casola.client import Client, RequestFailed
from casola.filter.base import FilterConfig, Verdict
from casola.wire import Buffer, ErrorCode
from tests.e2e.stack import Stack, run_uvloop


class SlowRules:
    """A classifier that takes 200 ms and flags inputs containing "forbidden"."""

    name = "slow"

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def classify(self, data: Buffer, content_type: str, model: str) -> asyncio.Future[Verdict]:
        fut: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        v = Verdict(flagged=b"forbidden" in bytes(data), label="test", classifier=self.name)
        asyncio.get_running_loop().call_later(0.2, fut.set_result, v)
        return fut


async def _run(stack: Stack, key: str, body: bytes, policy: str) -> tuple[float, bytes | RequestFailed]:
    c = await Client.connect(f"127.0.0.1:{stack.frames_port}", key)
    try:
        t0 = time.monotonic()
        s = c.stream("echo", body, params={"chunks": 4})
        got = b""
        try:
            async for piece in s:
                got += bytes(piece)
        except RequestFailed as exc:
            assert got == b"", "a byte of the answer left before the verdict"
            return time.monotonic() - t0, exc
        return time.monotonic() - t0, got
    finally:
        await c.close()


@pytest.mark.parametrize("policy", ["hold", "race"])
def test_no_byte_of_the_answer_leaves_before_a_clean_verdict(tmp_path: Path, policy: str) -> None:
    async def main() -> list[tuple[float, bytes | RequestFailed]]:
        filt = FilterConfig(policy="off", models={"echo": policy}, terms=["unused"])
        stack = await Stack(tmp_path, queue={"filter": filt}).start()
        try:
            stack.node.filtering.classifiers = [SlowRules()]
            await stack.add_worker()
            return [await _run(stack, stack.api_key, body, policy) for body in (b"fine words", b"forbidden words")]
        finally:
            await stack.stop()

    (t_clean, clean), (_, bad) = run_uvloop(main)
    assert clean == b"fine words"  # whole: its 4 frames were all held, then all sent
    if policy == "hold":
        assert t_clean >= 0.19  # held until the verdict, though echo answered at once
        assert isinstance(bad, RequestFailed) and bad.code == ErrorCode.CONTENT_POLICY_VIOLATION
    else:
        assert t_clean < 0.19  # race: the answer does not wait
        assert bad == b"forbidden words"  # it won the race: delivered, the verdict recorded late
