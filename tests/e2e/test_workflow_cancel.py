"""A workflow's client going away cancels every step in flight: the LLM still generating and the
TTS-like step of its first sentence both see CANCEL (issue 15, deliverables 4 and 9). The node,
ingress and workers are real (in this process), the client a real HTTP connection that is closed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from casola.flow import Engine, WorkflowConfig
from casola.worker import Echo, WorkerConfig, WorkerRuntime
from tests.e2e.stack import HttpClient, Stack, run_uvloop
from tests.require import need_module

WORKFLOW = {
    "steps": [
        {"name": "think", "kind": "llm", "model": "chat-random", "params": {"max_tokens": 1500}},
        {"name": "split", "kind": "sentences", "min_chars": 5, "max_chars": 30},
        {"name": "speak", "kind": "model", "model": "echo", "params": {"delay-ms": 5000}},
    ]
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_module("ctranslate2", "model-sets")
    from workers.tiny import build_tiny_set

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_set(root)
    return root


async def _until(cond: Any, timeout: float, what: str) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, what
        await asyncio.sleep(0.01)


def test_a_client_that_goes_away_cancels_every_step_in_flight(tmp_path: Path, tiny: Path) -> None:
    from workers.loader import build, resolve

    async def main() -> tuple[int, int, int]:
        stack = await Stack(tmp_path).start()
        llm = WorkerRuntime(
            WorkerConfig(queue=[stack.queue_addr], models=["chat-random"], capacity=2, threads=2),
            [build(resolve("chat-random", tiny))],
            stack.worker_key,
        )
        echo = Echo()
        speak_config = WorkerConfig(queue=[stack.queue_addr], models=["echo"], capacity=4)
        tts = WorkerRuntime(speak_config, [echo], stack.worker_key)
        engine = Engine({"talk": msgspec.convert(WORKFLOW, WorkflowConfig)}, stack.node.connect_member, "q")
        try:
            for rt in (llm, tts):
                await rt.start()
                await rt.wait_registered()
            await engine.start()
            client = await HttpClient.connect(stack.http_port)
            auth = {"Authorization": f"Bearer {stack.api_key}"}
            await client.send("POST", "/v1/workflows/talk", b"Tell me a long story.", auth)
            await _until(lambda: echo.started >= 1, 20, "no sentence reached the speak step")
            assert llm.active == 1  # the LLM is still generating
            client.writer.close()  # the client goes away
            await _until(lambda: echo.cancelled >= 1 and llm.cancelled >= 1, 5, "a step in flight was not cancelled")
            await _until(lambda: llm.active == 0 and tts.active == 0, 5, "a step kept running")
            return echo.started, echo.cancelled, llm.cancelled
        finally:
            await engine.stop()
            for rt in (llm, tts):
                await rt.stop()
            await stack.stop()

    started, echo_cancelled, llm_cancelled = run_uvloop(main, timeout=60)
    assert echo_cancelled == started  # every sentence sent on was cancelled, not left to run 5 s
    assert llm_cancelled == 1


def test_stopping_the_engine_lets_runs_in_flight_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    from casola.client import Client, RequestFailed
    from casola.wire import ErrorCode

    slow = {"steps": [{"name": "work", "kind": "model", "model": "echo", "params": {"delay-ms": 300}}]}

    async def main() -> tuple[bytes, int]:
        stack = await Stack(tmp_path).start()
        engine = Engine({"slow": msgspec.convert(slow, WorkflowConfig)}, stack.node.connect_member, "q")
        try:
            await stack.add_worker()
            await engine.start()
            c = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
            running = asyncio.ensure_future(c.run("slow", b"in flight"))
            await asyncio.sleep(0.1)
            stopping = asyncio.ensure_future(engine.stop())
            await asyncio.sleep(0.05)
            try:
                await c.run("slow", b"too late")
                code = 0
            except RequestFailed as exc:
                code = exc.code
            body = (await running).payload
            await stopping
            await c.close()
            return body, code
        finally:
            await stack.stop()

    body, code = run_uvloop(main)
    assert body == b"in flight"  # finished, though the engine was stopping
    assert code in (ErrorCode.NO_CAPACITY, ErrorCode.SHUTTING_DOWN)  # a new run: refused, retryable
