"""An error in one stream fails that stream only (DESIGN "Auth and tenancy"): a bad header value, an
answer the client's limits cannot take, a content type meant to split a response. The link every
tenant's requests share stays up, and no value from outside reaches an HTTP header unchecked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from casola.auth import SCOPE_RUN
from casola.client import Client, RequestFailed
from casola.wire import ErrorCode, Limits
from casola.worker import WorkCall
from tests.e2e.stack import HttpClient, Response, Stack, run_uvloop
from tests.e2e.test_jobs import jobs_stack

# What a worker may try to put in the head of its answer: (content type, extra headers).
BAD_HEADS = {
    "latin1": ("audio/\xff", {}),
    "crlf": ("text/plain\r\nx-injected: 1", {}),
    "bare-lf": ("text/plain\nx-injected: 1", {}),
    "split": ("text/plain", {"x-ok": "a\r\n\r\n<h1>injected</h1>"}),
    "name": ("text/plain", {"bad name": "x"}),
}


class Answers:
    """A model that answers with the head named by its `case` parameter, whole or streamed."""

    name = "answers"

    async def __call__(self, call: WorkCall) -> None:
        body = await call.body()
        ctype, headers = BAD_HEADS.get(str(call.params.get("case", "")), ("text/plain", {}))
        if call.params.get("stream") in ("1", 1):
            call.start(ctype, headers)
            await call.write(body)
            call.end()
        else:
            call.respond(body, ctype, headers)


def _auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


async def _post(port: int, key: str, path: str, body: bytes, **headers: str) -> Response:
    http = await HttpClient.connect(port)
    try:
        return await http.request("POST", path, body, _auth(key, **headers))
    finally:
        await http.close()


async def _others(stack: Stack, key: str, n: int = 8) -> list[int]:
    """Another tenant's requests, in flight on the same ingress->queue link meanwhile."""
    rs = await asyncio.gather(
        *(_post(stack.http_port, key, "/v1/run/echo", b"x", **{"X-Casola-Param-Delay-Ms": "300"}) for _ in range(n))
    )
    return [r.status for r in rs]


@pytest.mark.parametrize("stream", ["0", "1"])
@pytest.mark.parametrize("case", sorted(BAD_HEADS))
def test_a_worker_head_that_cannot_be_written_fails_its_request_only(tmp_path: Path, case: str, stream: str) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker(capacity=16, extra=[Answers()])
        other = stack.keys.ensure_key("other-key", "other", [SCOPE_RUN], "tests")
        try:
            others = asyncio.ensure_future(_others(stack, other))
            await asyncio.sleep(0.05)
            params = {"X-Casola-Param-Case": case, "X-Casola-Param-Stream": stream}
            r = await _post(stack.http_port, stack.api_key, "/v1/run/answers", b"body", **params)
            assert r.status == 502 and r.headers["content-type"] == "application/json"
            assert "x-injected" not in r.headers and "x-ok" not in r.headers
            assert "cannot be sent over HTTP" in msgspec.json.decode(r.body)["error"]["message"]  # one JSON body
            assert await others == [200] * 8  # the shared link stayed up for everyone else
            ok = await _post(stack.http_port, stack.api_key, "/v1/run/answers", b"fine")
            assert (ok.status, ok.body) == (200, b"fine")
        finally:
            await stack.stop()

    run_uvloop(main)


@pytest.mark.parametrize("ctype", ["audio/\xff", "audio/wav\nx-injected: 1"])
def test_a_multipart_part_type_that_cannot_be_a_header_is_refused_at_once(tmp_path: Path, ctype: str) -> None:
    """The report's case: a file part typed `audio/\\xff`, echoed back, closed the shared link."""

    async def main() -> None:
        stack = await Stack(tmp_path, ingress={"openai_aliases": {"whisper-1": "echo"}}).start()
        await stack.add_worker(capacity=16)
        other = stack.keys.ensure_key("other-key", "other", [SCOPE_RUN], "tests")
        body = (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\nRIFF....\r\n--b--\r\n"
        )
        try:
            others = asyncio.ensure_future(_others(stack, other))
            await asyncio.sleep(0.05)
            r = await _post(
                stack.http_port, stack.api_key, "/openai/v1/audio/transcriptions", body,
                **{"Content-Type": "multipart/form-data; boundary=b"},
            )  # fmt: skip
            assert r.status == 400 and b"Content-Type" in r.body
            assert "x-injected" not in r.headers
            assert await others == [200] * 8
        finally:
            await stack.stop()

    run_uvloop(main)


def test_an_answer_over_the_clients_metadata_limit_fails_that_stream_only(tmp_path: Path) -> None:
    """A frame client advertising max_meta 1,024 asks for an answer whose head is bigger: that stream
    gets an error; its other streams, and other clients, are served."""

    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker(capacity=16, extra=[BigHead()])
        small = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key, limits=Limits(max_meta=1024))
        try:
            slow = [asyncio.ensure_future(small.run("echo", b"s%d" % i, params={"delay-ms": 200})) for i in range(4)]
            await asyncio.sleep(0.05)
            with pytest.raises(RequestFailed) as err:
                await small.run("bighead", b"x")
            assert err.value.code == ErrorCode.INTERNAL and "relayed" in err.value.message
            assert [r.payload for r in await asyncio.gather(*slow)] == [b"s%d" % i for i in range(4)]
            assert (await small.run("echo", b"after")).payload == b"after"
        finally:
            await small.close()
            await stack.stop()

    run_uvloop(main)


class BigHead:
    name = "bighead"

    async def __call__(self, call: WorkCall) -> None:
        call.respond(b"ok", "text/plain", {f"x-h{i}": "v" * 60 for i in range(30)})  # ~2 KiB of headers


def test_a_job_content_type_made_to_split_a_response_is_refused(tmp_path: Path) -> None:
    """A frame-submitted job with `content_type="text/html\\r\\n\\r\\n<h1>..."` split the HTTP answer of
    /v1/jobs/{id}/result and of fal's result route."""

    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        await stack.add_worker()
        try:
            async with await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key) as c:
                for ctype in ("text/html\r\n\r\n<h1>owned</h1>", "text/html\nx-injected: 1", "text/\x00html"):
                    with pytest.raises(RequestFailed) as err:
                        await c.submit("echo", b"<p>", content_type=ctype)
                    assert err.value.code == ErrorCode.BAD_REQUEST
                    with pytest.raises(RequestFailed) as err:
                        await c.run("echo", b"<p>", content_type=ctype)
                    assert err.value.code == ErrorCode.BAD_REQUEST
                view = await c.submit("echo", b"<p>", content_type="text/html")
                assert (await c.job(view.request_id, wait_ms=5000)).status == "COMPLETED"
            http = await HttpClient.connect(stack.http_port)
            try:
                r = await http.request("GET", f"/v1/jobs/{view.request_id}/result", b"", _auth(stack.api_key))
                assert (r.status, r.headers["content-type"], r.body) == (200, "text/html", b"<p>")
            finally:
                await http.close()
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_stored_result_type_that_cannot_be_a_header_is_served_as_octets(tmp_path: Path) -> None:
    """Job records written before values were checked are still never written into a header."""

    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        try:
            jobs = stack.node.jobs
            assert jobs is not None
            from casola.store import NewJob

            job, _ = await jobs.store.submit(NewJob(tenant="dev", model="echo", payload=b"p"), 0.0)
            claimed = await jobs.store.claim_many(["echo"], "q/w", 30.0, 0.0, 1)
            ok = await jobs.store.complete(
                job.id, claimed[0].fence, 1.0, result=b"<h1>", content_type="text/html\r\n\r\n<h1>owned</h1>"
            )
            assert ok
            for path in (f"/v1/jobs/{job.id}/result", f"/acme/echo/requests/{job.id}"):
                http = await HttpClient.connect(stack.http_port)
                try:
                    r = await http.request("GET", path, b"", _auth(stack.api_key))
                finally:
                    await http.close()
                assert r.status == 200 and r.headers["content-type"] == "application/octet-stream"
                assert "<h1>owned" not in str(r.headers) and r.body == b"<h1>"
        finally:
            await stack.stop()

    run_uvloop(main)
