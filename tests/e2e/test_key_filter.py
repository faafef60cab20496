"""An API key's content-filter policy reaches the queue node in REQUEST `filter` on every surface that
runs a model or submits a job (native sync, raw frames, native async, fal), and a raw client cannot
pick its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from casola.auth import SCOPE_RUN
from casola.client import Client
from casola.queue.jobs import JobsConfig
from casola.wire import Frame, RequestMeta
from casola.worker.call import WorkCall
from tests.e2e.stack import HttpClient, Stack, run_uvloop


class Policy:
    """Model `policy`: answers with the `filter` of the RequestMeta the queue node forwarded."""

    name = "policy"

    async def __call__(self, call: WorkCall) -> None:
        await call.body()
        call.respond(call.meta.filter.encode(), "text/plain")


def record_requests(stack: Stack) -> list[RequestMeta]:
    """The RequestMeta of every REQUEST the queue node receives from an ingress."""
    seen: list[RequestMeta] = []
    node: Any = stack.node
    inner = node._on_request

    def spy(link: Any, frame: Frame, now: float) -> None:
        assert isinstance(frame.meta, RequestMeta)
        seen.append(frame.meta)
        inner(link, frame, now)

    node._on_request = spy
    return seen


async def start(tmp_path: Path) -> tuple[Stack, list[RequestMeta], str]:
    jobs = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", sweep_interval=0.1)
    stack = await Stack(tmp_path, queue={"jobs": jobs, "models": ["echo", "policy"]}).start()
    await stack.add_worker(extra=[Policy()])
    _claims, key = stack.keys.create("acme", [SCOPE_RUN], filter="block")
    return stack, record_requests(stack), key


def test_a_block_key_s_sync_request_carries_block_to_the_queue_node_and_worker(tmp_path: Path) -> None:
    async def main() -> None:
        stack, seen, key = await start(tmp_path)
        http = await HttpClient.connect(stack.http_port)
        try:
            r = await http.request("POST", "/v1/run/policy", b"x", {"Authorization": f"Bearer {key}"})
            assert (r.status, r.body) == (200, b"block")
            assert [(m.model, m.tenant, m.filter) for m in seen] == [("policy", "acme", "block")]
            plain = await http.request("POST", "/v1/run/policy", b"x", {"Authorization": f"Bearer {stack.api_key}"})
            assert (plain.status, plain.body) == (200, b"")  # a key without a policy: the model's applies
            assert seen[-1].filter == ""
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_raw_frames_overwrite_the_client_s_filter_with_the_key_s(tmp_path: Path) -> None:
    async def main() -> None:
        stack, seen, key = await start(tmp_path)
        blocked = await Client.connect(f"127.0.0.1:{stack.frames_port}", key)
        plain = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        try:
            # A client that asks for "off" itself gets its key's policy, or none.
            got = await blocked._open(RequestMeta("policy", filter="off", tenant="other"), b"x").read()
            assert got == b"block"
            assert (seen[-1].tenant, seen[-1].filter) == ("acme", "block")
            assert await plain._open(RequestMeta("policy", filter="off"), b"x").read() == b""
            assert (seen[-1].tenant, seen[-1].filter) == ("dev", "")
            assert (await blocked.run("policy", b"x")).payload == b"block"
        finally:
            await blocked.close()
            await plain.close()
            await stack.stop()

    run_uvloop(main)


def test_async_submits_carry_the_key_s_filter(tmp_path: Path) -> None:
    async def main() -> None:
        stack, seen, key = await start(tmp_path)
        http = await HttpClient.connect(stack.http_port)
        try:
            hdrs = {"Authorization": f"Bearer {key}", "X-Casola-Async": "1"}
            r = await http.request("POST", "/v1/run/policy", b"x", hdrs)
            assert r.status == 202, r.body
            r = await http.request("POST", "/someone/policy", b"{}", {"Authorization": f"Key {key}"})
            assert r.status == 200, r.body
            submits = [(m.op, m.model, m.tenant, m.filter) for m in seen if m.op == "submit"]
            assert submits == [("submit", "policy", "acme", "block")] * 2
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)
