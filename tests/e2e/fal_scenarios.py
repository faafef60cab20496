"""Drives the unmodified fal-client against a casola ingress; run by tests/e2e/test_fal_client.py in
a subprocess (fal-client reads FAL_QUEUE_RUN_HOST and FAL_KEY at import and speaks https only).

Usage: python fal_scenarios.py <scenario>; prints one JSON document of what it saw.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import fal_client
from fal_client import Completed, FalClientHTTPError, InProgress, Queued, Status


def _status(s: Status) -> dict[str, Any]:
    if isinstance(s, Queued):
        return {"type": "Queued", "position": s.position}
    if isinstance(s, InProgress):
        return {"type": "InProgress", "logs": s.logs}
    assert isinstance(s, Completed)
    return {"type": "Completed", "logs": s.logs, "metrics": s.metrics, "error": s.error, "error_type": s.error_type}


def _http_error(exc: FalClientHTTPError) -> dict[str, Any]:
    return {"status": exc.status_code, "message": exc.message, "error_type": exc.error_type}


def basic() -> dict[str, Any]:
    out: dict[str, Any] = {}
    handle = fal_client.submit("casola/echo", arguments={"prompt": "a red fox", "n": 3})
    out["request_id"] = handle.request_id
    out["urls"] = [handle.status_url, handle.response_url, handle.cancel_url]
    out["events"] = [_status(s) for s in handle.iter_events(with_logs=True, interval=0.05)]
    out["status"] = _status(handle.status(with_logs=True))
    out["status_no_logs"] = _status(handle.status())
    out["result"] = handle.get()
    # by id: the client builds https://{host}/casola/echo/requests/{id} itself
    out["by_id_status"] = _status(fal_client.status("casola/echo", handle.request_id, with_logs=True))
    out["by_id_result"] = fal_client.result("casola/echo", handle.request_id)

    updates: list[dict[str, Any]] = []
    enqueued: list[str] = []
    out["subscribe"] = fal_client.subscribe(
        "casola/echo/sub/path",
        arguments={"x": 1},
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=lambda s: updates.append(_status(s)),
    )
    out["subscribe_updates"] = updates
    out["subscribe_enqueued"] = enqueued

    async def run_async() -> Any:
        h = await fal_client.submit_async("casola/echo", arguments={"async": True})
        return await h.get()

    out["async_result"] = asyncio.run(run_async())
    return out


def cancel() -> dict[str, Any]:
    out: dict[str, Any] = {}
    # `idle` is a model the queue node knows with no worker: its jobs wait in the queue
    queued = fal_client.submit("casola/idle", arguments={"wait": True})
    out["queued_status"] = _status(queued.status())
    queued.cancel()
    out["queued_after_cancel"] = _status(queued.status(with_logs=True))
    try:
        queued.get()
    except FalClientHTTPError as exc:
        out["queued_get"] = _http_error(exc)
    try:
        queued.cancel()
    except FalClientHTTPError as exc:
        out["cancel_again"] = _http_error(exc)

    running = fal_client.submit("casola/echo", arguments={}, headers={"X-Casola-Param-Delay-Ms": "10000"})
    deadline = time.monotonic() + 10
    while not isinstance(status := running.status(), InProgress) and time.monotonic() < deadline:
        time.sleep(0.02)
    out["running_status"] = _status(status)
    fal_client.cancel("casola/echo", running.request_id)
    out["running_after_cancel"] = _status(running.status())
    return out


def errors() -> dict[str, Any]:
    out: dict[str, Any] = {}
    failing = fal_client.submit("casola/echo", arguments={}, headers={"X-Casola-Param-Fail": "no good"})
    out["failed_status"] = [_status(s) for s in failing.iter_events(interval=0.05)][-1]
    try:
        failing.get()
    except FalClientHTTPError as exc:
        out["failed_get"] = _http_error(exc)
    for name, call in (
        ("unknown_model", lambda: fal_client.submit("casola/no-such-model", arguments={})),
        ("unknown_id", lambda: fal_client.status("casola/echo", "no-such-request")),
        ("unknown_cancel", lambda: fal_client.cancel("casola/echo", "no-such-request")),
        ("bad_key", lambda: fal_client.SyncClient(key="csk_not.a.key").submit("casola/echo", arguments={})),
    ):
        try:
            call()
        except FalClientHTTPError as exc:
            out[name] = _http_error(exc)
    return out


if __name__ == "__main__":
    print(json.dumps({"basic": basic, "cancel": cancel, "errors": errors}[sys.argv[1]]()))
