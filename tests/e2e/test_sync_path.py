"""The sync request path end to end over real loopback sockets, under uvloop: HTTP and raw frames
in, ingress -> queue node -> worker -> back, with Server-Timing, errors and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

import pytest

from casola.client import Client, RequestFailed
from tests.e2e.stack import HttpClient, Stack, run_uvloop, timing

SIZES = [0, 1, 1023, 1024, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 1024 * 1024, 8 * 1024 * 1024]
STAGES = {"ingress", "queue-overhead", "wait", "worker-rtt", "work"}


def _auth(stack: Stack, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}", **extra}


def test_byte_identical_round_trips_http_and_frames(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        try:
            for size in SIZES:
                body = os.urandom(size)
                r = await http.request("POST", "/v1/run/echo", body, _auth(stack))
                assert (r.status, len(r.body)) == (200, size)
                assert r.body == body
                for params in ({}, {"chunks": 7}):
                    res = await client.run("echo", body, params=params)
                    assert res.payload == body, (size, params)  # the same bytes as over HTTP
                    assert STAGES <= set(res.timing)
        finally:
            await client.close()
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_streamed_answer_arrives_chunk_by_chunk_with_timing_trailer(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            hdrs = _auth(
                stack, **{"X-Casola-Trace": "1", "X-Casola-Param-Chunks": "4", "X-Casola-Param-Chunk-Delay-Ms": "150"}
            )
            r = await http.request("POST", "/v1/run/echo", b"abcdefgh", hdrs)
            assert r.status == 200 and r.complete and r.body == b"abcdefgh"
            assert [c for _, c in r.chunks] == [b"ab", b"cd", b"ef", b"gh"]
            first, last = r.chunks[0][0], r.chunks[-1][0]
            assert last - first >= 0.4  # the first chunk came ~450 ms before the last was produced
            assert r.headers["trailer"].lower() == "server-timing"
            head = timing(r.headers["server-timing"])
            totals = timing(r.trailers["server-timing"])
            assert {"ingress", "queue-overhead", "wait", "worker-rtt"} <= set(head)
            assert STAGES <= set(totals) and totals["work"] >= 400
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_server_timing_only_when_traced_or_configured(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path, ingress={"timing_allow_origin": "*"}).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        try:
            plain = await http.request("POST", "/v1/run/echo", b"x", _auth(stack))
            assert "server-timing" not in plain.headers
            traced = await http.request("POST", "/v1/run/echo", b"x", _auth(stack, **{"X-Casola-Trace": "1"}))
            st = timing(traced.headers["server-timing"])
            assert list(st) == ["ingress", "queue-overhead", "wait", "worker-rtt", "work"]
            assert all(v >= 0 for v in st.values()) and st["worker-rtt"] >= st["work"]
            assert "." in traced.headers["server-timing"].split("dur=")[1]  # sub-millisecond precision
            assert traced.headers["timing-allow-origin"] == "*"
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_error_envelope_and_statuses(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path, queue={"models": ["idle"], "max_pending": 2}).start()
        await stack.add_worker(capacity=1)
        http = await HttpClient.connect(stack.http_port)
        try:
            r = await http.request("POST", "/v1/run/nope", b"x", _auth(stack))
            assert r.status == 404
            assert _error(r) == ("not_found_error", "unknown_model")
            r = await http.request("POST", "/v1/run/idle", b"x", _auth(stack))  # known, no worker
            assert r.status == 503 and _error(r) == ("no_capacity", "no_capacity")
            assert r.headers["retry-after"] == "1" and r.headers["x-should-retry"] == "true"
            r = await http.request("POST", "/v1/run/echo", b"x", _auth(stack, **{"X-Casola-Param-Fail": "bad input"}))
            assert r.status == 400 and _error(r)[0] == "invalid_request_error"
            r = await http.request(
                "POST",
                "/v1/run/echo",
                b"x",
                _auth(stack, **{"X-Casola-Param-Delay-Ms": "500", "X-Casola-Deadline-Ms": "50"}),
            )
            assert r.status == 504 and _error(r)[1] == "deadline_exceeded"
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def _error(r: object) -> tuple[str, str]:
    import json

    err = json.loads(r.body)["error"]  # type: ignore[attr-defined]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err["type"], err["code"]


def test_overload_is_refused_at_once_with_429(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path, queue={"max_pending": 2}).start()
        await stack.add_worker(capacity=1)
        clients = [await HttpClient.connect(stack.http_port) for _ in range(6)]
        try:
            slow = _auth(stack, **{"X-Casola-Param-Delay-Ms": "400"})
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            results = await asyncio.gather(*(c.request("POST", "/v1/run/echo", b"x", slow) for c in clients))
            statuses = sorted(r.status for r in results)
            assert statuses == [200, 200, 200, 429, 429, 429]  # 1 running + 2 waiting; the rest refused
            refused = [r for r in results if r.status == 429]
            assert all(r.headers["retry-after"] and r.headers["x-should-retry"] == "true" for r in refused)
            assert _error(refused[0]) == ("rate_limit_error", "overloaded")
            assert loop.time() - t0 < 5
        finally:
            for c in clients:
                await c.close()
            await stack.stop()

    run_uvloop(main)


def test_client_disconnect_cancels_the_handler(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt, echo = await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        await http.send("POST", "/v1/run/echo", b"x", _auth(stack, **{"X-Casola-Param-Delay-Ms": "5000"}))
        for _ in range(200):
            if echo.started:
                break
            await asyncio.sleep(0.01)
        assert echo.started == 1
        await http.close()  # the client goes away mid-request
        for _ in range(200):
            if echo.cancelled:
                break
            await asyncio.sleep(0.01)
        assert echo.cancelled == 1 and echo.finished == 0
        assert rt.active == 0
        await stack.wait_workers(1)
        assert stack.node.registry.snapshot()["echo"]["free"] == 8  # the slot came back
        await stack.stop()

    run_uvloop(main)


def test_raw_frame_client_cancel_reaches_the_worker(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        _, echo = await stack.add_worker()
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        async with client.stream("echo", b"x", params={"delay-ms": 5000}):
            while not echo.started:
                await asyncio.sleep(0.01)
        while not echo.cancelled:
            await asyncio.sleep(0.01)
        with pytest.raises(RequestFailed) as info:
            await client.run("nope")
        assert info.value.code == 35 and not info.value.retryable
        await client.close()
        await stack.stop()

    run_uvloop(main)


def test_retry_before_first_byte_goes_to_another_worker(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt_a, echo_a = await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        await http.send("POST", "/v1/run/echo", b"payload", _auth(stack, **{"X-Casola-Param-Delay-Ms": "300"}))
        while not echo_a.started:
            await asyncio.sleep(0.01)
        _, echo_b = await stack.add_worker()
        await rt_a.stop()  # A dies before answering: the queue node retries once, on B
        r = await http.read_response()
        assert r.status == 200 and r.body == b"payload"
        assert echo_b.finished == 1 and stack.node.stats["retries"] == 1
        await http.close()
        await stack.stop()

    run_uvloop(main)


MIB = 1024 * 1024


async def _ask_for(stack: Stack, repeat: int) -> socket.socket:
    """A client with a small receive buffer that asks echo for `repeat` MiB of answer (1 MiB sent
    `repeat` times over) and then reads only as the test says."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", stack.http_port))
    head = (
        f"POST /v1/run/echo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {stack.api_key}\r\n"
        f"X-Casola-Param-Repeat: {repeat}\r\nContent-Length: {MIB}\r\n\r\n"
    )
    await loop.sock_sendall(sock, head.encode() + bytes(MIB))
    return sock


def test_a_client_that_stops_reading_is_dropped_not_buffered_without_bound(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        # An answer larger than what may stay unread ... and the client never reads.
        sock = await _ask_for(stack, stack.ingress.unread_max // MIB + 8)
        for _ in range(250):
            if stack.ingress.in_flight:
                break
            await asyncio.sleep(0.02)
        for _ in range(500):
            if stack.ingress.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert stack.ingress.in_flight == 0  # the ingress gave up on it
        assert stack.ingress.metrics.requests.get(("echo", 499)) == 1
        sock.close()
        await stack.stop()

    run_uvloop(main)


def test_a_client_that_takes_nothing_for_send_timeout_is_aborted(tmp_path: Path) -> None:
    """An answer below the unread bound, but the client reads none of it: aborted after
    `send_timeout`, its place and its buffers freed (a graceful close would keep them)."""

    async def main() -> None:
        stack = await Stack(tmp_path, ingress={"send_timeout": 0.5}).start()
        await stack.add_worker()
        loop = asyncio.get_running_loop()
        sock = await _ask_for(stack, 16)  # a 16 MiB answer, not read for now
        await asyncio.sleep(2.0)  # well past the send timeout
        got = 0
        with contextlib.suppress(ConnectionError):
            while data := await loop.sock_recv(sock, 1 << 20):  # what the kernel had, then the end
                got += len(data)
        assert got < 12 * MIB and stack.ingress.in_flight == 0  # the rest was dropped, not kept for it
        sock.close()
        await stack.stop()

    run_uvloop(main)


def test_a_client_that_reads_slowly_is_not_taken_for_one_that_stopped(tmp_path: Path) -> None:
    """The send timeout counts from the client's last bytes taken, not from when writing paused."""

    async def main() -> None:
        stack = await Stack(tmp_path, ingress={"send_timeout": 0.5}).start()
        await stack.add_worker()
        loop = asyncio.get_running_loop()
        sock = await _ask_for(stack, 8)
        got, t0 = 0, loop.time()
        gaps: list[float] = []
        while got < 8 * MIB:  # ~3 MiB/s: several send timeouts long, taking bytes all along
            t = loop.time()
            data = await loop.sock_recv(sock, 64 * 1024)
            gaps.append(loop.time() - t)
            assert data, f"cut after {got} bytes; longest waits {sorted(gaps)[-3:]}"
            got += len(data)
            await asyncio.sleep(0.02)
        assert loop.time() - t0 > 1.0  # it really took longer than the send timeout
        sock.close()
        await stack.stop()

    run_uvloop(main)
