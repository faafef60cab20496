"""The unmodified fal-client against the ingress over TLS (DESIGN "API surfaces"): submit, status
with logs, iter_events, get/result, subscribe, the async client, cancel queued and running, and
fal-shaped errors. fal-client runs in a subprocess (tests/e2e/fal_scenarios.py): it reads its host
and key from the environment at import and speaks https only."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from casola.certs import make_dev_certs
from casola.queue.jobs import JobsConfig
from tests.e2e.stack import Stack, run_uvloop
from tests.require import need_module

need_module("fal_client")

SCRIPT = Path(__file__).with_name("fal_scenarios.py")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def tls_stack(tmp_path: Path) -> Stack:
    certs = make_dev_certs(tmp_path / "certs")
    cfg = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", sweep_interval=0.1)
    return Stack(
        tmp_path,
        ingress={"tls_cert": str(certs.cert), "tls_key": str(certs.key)},
        queue={"jobs": cfg, "models": ["echo", "idle"]},
    )


async def run_scenario(stack: Stack, name: str, timeout: float = 60) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env.update(
        FAL_QUEUE_RUN_HOST=f"127.0.0.1:{stack.http_port}",
        FAL_KEY=stack.api_key,
        SSL_CERT_FILE=str(stack.state_dir / "certs" / "ca.pem"),
        NO_PROXY="*",
        FAL_HOME_DIR=str(stack.state_dir / "fal-home"),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), name, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()[-4000:]
    doc = json.loads(out.splitlines()[-1])
    assert isinstance(doc, dict)
    return doc


def test_submit_status_result_subscribe_and_the_async_client(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await tls_stack(tmp_path).start()
        try:
            await stack.add_worker()
            out = await run_scenario(stack, "basic")
        finally:
            await stack.stop()
        rid = out["request_id"]
        base = f"https://127.0.0.1:{stack.http_port}/casola/echo/requests/{rid}"
        assert out["urls"] == [base + "/status", base, base + "/cancel"]
        assert out["result"] == out["by_id_result"] == {"prompt": "a red fox", "n": 3}
        assert out["events"][-1]["type"] == "Completed"
        assert all(e["type"] in ("Queued", "InProgress", "Completed") for e in out["events"])
        done = out["status"]
        assert done["type"] == "Completed" and done["error"] is None and done["error_type"] is None
        assert done["metrics"]["inference_time"] >= 0
        messages = [log["message"] for log in done["logs"]]
        assert messages[0] == "job submitted" and messages[-1] == "job completed"
        assert set(done["logs"][0]) >= {"message", "level", "source", "timestamp"}
        assert out["status_no_logs"]["logs"] is None
        assert out["by_id_status"]["type"] == "Completed"
        assert out["subscribe"] == {"x": 1}  # the path suffix goes to the model as a parameter
        assert out["subscribe_updates"][-1]["type"] == "Completed" and len(out["subscribe_enqueued"]) == 1
        assert out["async_result"] == {"async": True}

    run_uvloop(main)


def test_cancel_queued_and_running_requests(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await tls_stack(tmp_path).start()
        try:
            _, echo = await stack.add_worker()
            out = await run_scenario(stack, "cancel")
            assert echo.cancelled == 1  # the running job's CANCEL reached the handler
        finally:
            await stack.stop()
        assert out["queued_status"] == {"type": "Queued", "position": 0}
        after = out["queued_after_cancel"]
        assert (after["type"], after["error_type"]) == ("Completed", "cancelled")
        assert after["logs"][-1]["level"] == "ERROR"
        assert out["queued_get"]["status"] == 400 and out["queued_get"]["error_type"] == "cancelled"
        assert out["cancel_again"]["status"] == 400  # ALREADY_COMPLETED
        assert out["running_status"]["type"] == "InProgress"
        running = out["running_after_cancel"]
        assert (running["type"], running["error_type"]) == ("Completed", "cancelled")

    run_uvloop(main)


def test_errors_come_back_in_fals_shape(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await tls_stack(tmp_path).start()
        try:
            await stack.add_worker()
            out = await run_scenario(stack, "errors")
        finally:
            await stack.stop()
        failed = out["failed_status"]
        assert (failed["type"], failed["error_type"]) == ("Completed", "invalid_request_error")
        assert "no good" in failed["error"]
        assert out["failed_get"]["status"] == 400 and "no good" in out["failed_get"]["message"]
        assert out["failed_get"]["error_type"] == "invalid_request_error"
        assert out["unknown_model"]["status"] == 404 and out["unknown_model"]["error_type"] == "not_found_error"
        assert out["unknown_id"]["status"] == 404 and out["unknown_cancel"]["status"] == 404
        assert out["bad_key"]["status"] == 401 and out["bad_key"]["error_type"] == "authentication_error"

    run_uvloop(main)
