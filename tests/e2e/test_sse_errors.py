"""An error after a `text/event-stream` answer has started reaches the client as a last SSE event,
`event: error` with the HTTP error envelope, and the chunked body then ends properly (keep-alive
survives); any other streamed answer that fails mid-way is still truncated."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from casola.wire import ErrorCode
from casola.worker.call import HandlerError, WorkCall
from tests.e2e.stack import HttpClient, Stack, run_uvloop, timing

FIRST = b'data: {"n": 1}\n\n'


class FailMidStream:
    """Starts an answer of the request's `ct` param, writes `first` (the param with `\\n` for a newline,
    else FIRST), then fails."""

    name = "fail-mid-stream"

    async def __call__(self, call: WorkCall) -> None:
        await call.body()
        call.start(str(call.params.get("ct", "text/event-stream")), {"cache-control": "no-cache"})
        first = str(call.params["first"]).replace("\\n", "\n").encode() if "first" in call.params else FIRST
        await call.write(first)
        await asyncio.sleep(0.02)  # the first event reaches the client on its own
        raise HandlerError("the model fell over", ErrorCode.WORKER_FAILED, param="prompt")


def _hdrs(stack: Stack, trace: bool = False, **params: str) -> dict[str, str]:
    hdrs = {"Authorization": f"Bearer {stack.api_key}", **({"X-Casola-Trace": "1"} if trace else {})}
    hdrs.update({f"X-Casola-Param-{k}": v for k, v in params.items()})
    return hdrs


async def _stack(tmp_path: Path) -> Stack:
    stack = await Stack(tmp_path).start()
    await stack.add_worker(extra=[FailMidStream()])
    await stack.wait_workers(1, FailMidStream.name)
    return stack


def _error_event(body: bytes, first: bytes) -> dict[str, object]:
    assert body.startswith(first)
    event = body[len(first) :]
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n") and event.count(b"\n") == 3
    doc = json.loads(event[len(b"event: error\ndata: ") : -2])
    assert isinstance(doc, dict)
    return doc


def test_sse_gets_an_error_event_then_a_complete_body(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await _stack(tmp_path)
        http = await HttpClient.connect(stack.http_port)
        try:
            r = await http.request("POST", "/v1/run/fail-mid-stream", b"x", _hdrs(stack, trace=True))
            assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
            assert r.headers["transfer-encoding"] == "chunked" and r.complete
            assert r.chunks[0][1] == FIRST  # the first event arrived before the failure
            doc = _error_event(r.body, FIRST)
            assert doc == {
                "error": {
                    "message": "the model fell over",
                    "type": "worker_error",
                    "param": "prompt",
                    "code": "worker_failed",
                }
            }
            assert "ingress" in timing(r.trailers["server-timing"])  # as a stream that ends well
            assert stack.ingress.metrics.requests[(FailMidStream.name, 502)] == 1  # the error's status
            # The body ended properly: the connection serves the next request.
            again = await http.request("POST", "/v1/run/echo", b"next", _hdrs(stack))
            assert (again.status, again.body) == (200, b"next")
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_sse_with_parameters_and_without_trace(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await _stack(tmp_path)
        http = await HttpClient.connect(stack.http_port)
        try:
            ct = "text/event-stream; charset=utf-8"
            r = await http.request("POST", "/v1/run/fail-mid-stream", b"x", _hdrs(stack, ct=ct))
            assert r.complete and r.trailers == {} and r.headers["content-type"] == ct
            assert _error_event(r.body, FIRST)["error"]["code"] == "worker_failed"  # type: ignore[index]
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_an_event_left_half_written_is_ended_before_the_error_event(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await _stack(tmp_path)
        http = await HttpClient.connect(stack.http_port)
        try:
            r = await http.request("POST", "/v1/run/fail-mid-stream", b"x", _hdrs(stack, first='data: {"n":'))
            assert r.complete
            doc = _error_event(r.body, b'data: {"n":\n\n')  # its own event: no field merges into the error
            assert doc["error"]["type"] == "worker_error"  # type: ignore[index]
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_a_non_sse_stream_that_fails_mid_way_is_still_truncated(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await _stack(tmp_path)
        http = await HttpClient.connect(stack.http_port)
        try:
            hdrs = _hdrs(stack, ct="application/x-ndjson", first='{"n": 1}\\n')
            await http.send("POST", "/v1/run/fail-mid-stream", b"x", hdrs)
            r = await asyncio.wait_for(http.read_response(), 10)
            assert r.status == 200 and not r.complete and r.body == b'{"n": 1}\n'
            assert await asyncio.wait_for(http.reader.read(), 10) == b""  # closed: no last chunk, no event
            assert stack.ingress.metrics.requests[(FailMidStream.name, 502)] == 1
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)
