"""The async job life cycle through a real deployment on loopback (raw frames, SPEC §3.8.1):
persisted before the answer, leased with a fence, checkpointed, redispatched from the last
checkpoint, recorded once, cancellable queued and running, visible only to its tenant."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from casola.auth import SCOPE_RUN
from casola.client import Client, RequestFailed, Result
from casola.queue.jobs import JobsConfig
from casola.wire import ErrorCode
from casola.worker import Steps
from tests.e2e.stack import Stack, run_uvloop


def jobs_stack(tmp_path: Path, *, outbound_allow: list[str] | None = None, **jobs: object) -> Stack:
    cfg = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", sweep_interval=0.1, **jobs)  # type: ignore[arg-type]
    queue: dict[str, object] = {"jobs": cfg, "models": ["echo", "steps"]}
    if outbound_allow is not None:  # webhook receivers on loopback need the operator's allow-list
        queue["outbound_allow"] = outbound_allow
    return Stack(tmp_path, queue=queue)


async def connect(stack: Stack, key: str | None = None) -> Client:
    return await Client.connect(f"127.0.0.1:{stack.frames_port}", key or stack.api_key)


def test_a_submitted_job_runs_and_its_result_is_kept(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            await stack.add_worker()
            async with await connect(stack) as c:
                view = await c.submit("echo", b"hello job", content_type="text/plain")
                assert view.status in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED") and view.model == "echo"
                done = await c.job(view.request_id, wait_ms=5000)
                assert done.status == "COMPLETED" and not done.error_type and done.attempt == 1
                assert done.inference_ms is not None and done.inference_ms >= 0
                result = await c.job_result(view.request_id)
                assert isinstance(result, Result)
                assert result.payload == b"hello job" and result.content_type == "text/plain"
                # a second read gives the same stored result
                again = await c.job_result(view.request_id)
                assert isinstance(again, Result) and again.payload == b"hello job"
            assert stack.node.jobs is not None and stack.node.jobs.stats["completed"] == 1
        finally:
            await stack.stop()

    run_uvloop(main)


def test_submit_is_idempotent_per_key(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            async with await connect(stack) as c:
                a = await c.submit("echo", b"once", idempotency_key="k-1")
                b = await c.submit("echo", b"once", idempotency_key="k-1")
                other = await c.submit("echo", b"once", idempotency_key="k-2")
                assert a.request_id == b.request_id != other.request_id
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_queued_job_waits_for_a_worker_and_reports_its_place(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            async with await connect(stack) as c:
                first = await c.submit("echo", b"1")
                second = await c.submit("echo", b"2")
                assert (first.status, first.queue_position) == ("IN_QUEUE", 0)
                assert (second.status, second.queue_position) == ("IN_QUEUE", 1)
                pending = await c.job_result(second.request_id)
                assert not isinstance(pending, Result) and pending.status == "IN_QUEUE"
                await stack.add_worker()
                for job, body in ((first, b"1"), (second, b"2")):
                    result = await c.job_result(job.request_id, wait_ms=5000)
                    assert isinstance(result, Result) and result.payload == body
        finally:
            await stack.stop()

    run_uvloop(main)


def test_cancel_while_queued_and_while_running(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            async with await connect(stack) as c:
                queued = await c.submit("steps", b"", params={"steps": 3})
                view = await c.cancel_job(queued.request_id)
                assert (view.status, view.error_type) == ("COMPLETED", "cancelled")

                steps = Steps()
                await stack.add_worker(extra=[steps])
                running = await c.submit("steps", b"", params={"steps": 50, "step-ms": 50})
                for _ in range(200):
                    if steps.steps_run >= 2:
                        break
                    await asyncio.sleep(0.02)
                view = await c.cancel_job(running.request_id)
                assert (view.status, view.error_type) == ("COMPLETED", "cancelled")
                ran = steps.steps_run
                await asyncio.sleep(0.3)
                assert steps.steps_run <= ran + 1, "the handler kept running after CANCEL"
                assert stack.workers[0].active == 0
                # cancelling a completed job changes nothing
                again = await c.cancel_job(running.request_id)
                assert (again.status, again.error_type) == ("COMPLETED", "cancelled")
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_redispatched_job_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            first_steps = Steps()
            first, _ = await stack.add_worker(extra=[first_steps], node_id="w-first")
            async with await connect(stack) as c:
                job = await c.submit("steps", b"input", params={"steps": 8, "step-ms": 60})
                for _ in range(300):
                    if first_steps.steps_run >= 3:
                        break
                    await asyncio.sleep(0.01)
                await first.stop()  # the worker vanishes mid-job
                stack.workers.remove(first)
                await stack.add_worker(extra=[Steps()], node_id="w-second")
                result = await c.job_result(job.request_id, wait_ms=10_000)
                assert isinstance(result, Result), result
                answer = msgspec.json.decode(result.payload)
                assert answer["resumed_at"] >= 3 and answer["ran"] == list(range(answer["resumed_at"] + 1, 9))
                assert answer["attempt"] == 1 and answer["input_bytes"] == 5
                view = await c.job(job.request_id)
                assert view.attempt == 2 and view.progress == 1.0
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_job_whose_workers_keep_failing_completes_with_an_error(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path, max_attempts=2).start()
        try:
            async with await connect(stack) as c:
                bad = await c.submit("echo", b"x", params={"fail": "no such thing"})
                await stack.add_worker()
                view = await c.job(bad.request_id, wait_ms=5000)
                # a handler's refusal is final: no redispatch, an error recorded once
                assert view.status == "COMPLETED" and view.error_type == "invalid_request_error"
                assert "no such thing" in view.error and view.attempt == 1
        finally:
            await stack.stop()

    run_uvloop(main)


def test_tenants_see_only_their_own_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            other_key = stack.keys.ensure_key("other-key", "other-tenant", [SCOPE_RUN], "tests")
            async with await connect(stack) as mine, await connect(stack, other_key) as theirs:
                job = await mine.submit("echo", b"secret")
                for probe in (theirs.job, theirs.job_result, theirs.cancel_job):
                    with pytest.raises(RequestFailed) as err:
                        await probe(job.request_id)
                    assert err.value.code == ErrorCode.JOB_NOT_FOUND
                assert (await mine.job(job.request_id)).status == "IN_QUEUE"  # not cancelled by them
        finally:
            await stack.stop()

    run_uvloop(main)


def test_unknown_jobs_and_models(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            async with await connect(stack) as c:
                with pytest.raises(RequestFailed) as err:
                    await c.job("nope")
                assert err.value.code == ErrorCode.JOB_NOT_FOUND
                with pytest.raises(RequestFailed) as err:
                    await c.submit("no-such-model", b"")
                assert err.value.code == ErrorCode.UNKNOWN_MODEL
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_completed_job_posts_its_signed_webhook_once_delivered(tmp_path: Path) -> None:
    from casola.queue.webhooks import WebhookSigner, public_key_path, public_whpk_path, verify_webhook
    from tests.queue.test_webhooks import Receiver

    async def main() -> None:
        key = tmp_path / "webhook-key.pem"
        stack = await jobs_stack(tmp_path, outbound_allow=["127.0.0.0/8"], webhook_key=str(key)).start()
        try:
            await stack.add_worker()
            async with Receiver([(503, {}), (200, {})]) as receiver, await connect(stack) as c:
                job = await c.submit(
                    "echo", b'{"answer": 42}', content_type="application/json", webhook_url=receiver.url
                )
                for _ in range(300):  # the first attempt gets 503, the retry (backoff ~1 s) 200
                    if len(receiver.requests) >= 2:
                        break
                    await asyncio.sleep(0.02)
                assert len(receiver.requests) == 2
                public = WebhookSigner.load_or_create(key).public_key
                assert public_key_path(key).exists()
                whpk = public_whpk_path(key).read_text()  # the Standard Webhooks form receivers are given
                for req in receiver.requests:
                    assert req.headers["webhook-id"] == job.request_id
                    assert verify_webhook(req.headers, req.body, [public], time.time()) == job.request_id
                    assert verify_webhook(req.headers, req.body, [whpk], time.time()) == job.request_id
                    body = msgspec.json.decode(req.body)
                    assert body["request_id"] == job.request_id and body["status"] == "OK"
                    assert body["payload"] == {"answer": 42}
                for _ in range(100):  # the delivery is recorded: the sweep sends it no more
                    stored = await stack.node.jobs.store.get(job.request_id, None)  # type: ignore[union-attr]
                    if stored is not None and stored.webhook_done:
                        break
                    await asyncio.sleep(0.02)
                assert stored is not None and stored.webhook_done and stored.webhook_attempts == 2
                await asyncio.sleep(0.3)
                assert len(receiver.requests) == 2
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_bad_webhook_url_is_refused_at_submit(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            async with await connect(stack) as c:
                with pytest.raises(RequestFailed) as err:
                    await c.submit("echo", b"", webhook_url="file:///etc/passwd")
                assert err.value.code == ErrorCode.BAD_REQUEST and "webhook" in err.value.message
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_loopback_webhook_url_is_refused_without_an_allow_list(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            async with await connect(stack) as c:
                for url in ("http://127.0.0.1:9/hook?token=s3cret", "http://2130706433/hook", "http://[::1]/hook"):
                    with pytest.raises(RequestFailed) as err:
                        await c.submit("echo", b"", webhook_url=url)
                    assert err.value.code == ErrorCode.BAD_REQUEST
                    assert "webhook" in err.value.message and "loopback" in err.value.message
                    assert "/hook" not in err.value.message and "s3cret" not in err.value.message
                ok = await c.submit("echo", b"", webhook_url="https://hooks.example.com/hook")  # names: at delivery
                assert ok.status == "IN_QUEUE"
        finally:
            await stack.stop()

    run_uvloop(main)
