"""`GET /v1/realtime` end to end over real loopback sockets, under uvloop: an unmodified `websockets`
client, the ingress, the queue node and an in-process worker serving `rt`, a streaming model defined
here (the built-in echo reads its whole input before it answers; a session never ends its input).

`rt` echoes each message the moment it arrives (the DATA payload as it came: tag byte and all), and obeys
a few text commands: `{"cmd": "end"}` ends the stream, `fail` answers ERROR with a code, `crash` raises,
`flood` writes `n` binary messages of `size` bytes, `badtag` writes a payload with no valid tag,
`pieces` writes two messages in DATA frames cut at `cuts`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from casola.auth import SCOPE_RUN
from casola.certs import make_dev_certs
from casola.realtime.framing import MessageReader
from casola.wire import ErrorCode
from casola.worker.call import HandlerError, WorkCall
from tests.e2e.stack import HttpClient, Stack, run_uvloop
from tests.require import need_module

websockets = need_module("websockets")
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402


def _msg(tag: int, data: bytes) -> bytes:
    """One message on the session's stream, as docs/realtime.md lays it out: tag, u32 length, bytes."""
    return struct.pack("!BI", tag, len(data)) + data


class Rt:
    """The streaming test model: one long-lived stream, each input message answered as it arrives."""

    name = "rt"

    def __init__(self) -> None:
        self.started = self.ended = self.cancelled = 0
        self.flooded = 0
        self.inputs: list[bytes] = []  # each message as it came: tag byte, then its bytes
        self.payloads: list[bytes] = []  # the DATA payloads as they came

    async def __call__(self, call: WorkCall) -> None:
        self.started += 1
        reader = MessageReader()
        try:
            call.start("application/x-casola-realtime")
            async for chunk in call.chunks():
                self.payloads.append(bytes(chunk))
                for tag, body in reader.feed(chunk):
                    self.inputs.append(bytes([tag]) + body)
                    if tag == 1 and body[:1] == b"{":
                        if await self._command(call, json.loads(bytes(body))):
                            return
                    else:
                        await call.write(_msg(tag, bytes(body)))
            self.ended += 1  # the client closed: END came upstream
            call.end()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _command(self, call: WorkCall, cmd: dict[str, Any]) -> bool:
        op = cmd.get("cmd")
        if op == "end":
            await call.write(_msg(1, b'{"type":"bye"}'))
            call.end()
            return True
        if op == "fail":
            raise HandlerError(cmd.get("message", "no"), ErrorCode[cmd.get("code", "BAD_REQUEST")],
                               retry_after_ms=cmd.get("retry_after_ms", 0))  # fmt: skip
        if op == "crash":
            raise RuntimeError("the model crashed")
        if op == "flood":
            piece = _msg(2, b"f" * cmd["size"])
            for _ in range(cmd["n"]):
                await call.write(piece)
                self.flooded += 1
        elif op == "badtag":
            await call.write(b"\x07\x00\x00\x00\x04oops")
        elif op == "pieces":  # two messages cut anywhere: the frames' boundaries are not the messages'
            data = _msg(1, b'{"type":"one"}') + _msg(2, b"two" * 100)
            for cut in cmd["cuts"]:
                await call.write(data[:cut])
                data = data[cut:]
            await call.write(data)
        else:
            await call.write(_msg(1, msgspec.json.encode(cmd)))  # any other JSON: echoed
        return False


async def _stack(tmp_path: Path, **ingress: Any) -> tuple[Stack, Rt]:
    stack = await Stack(tmp_path, ingress=ingress or None).start()
    rt = Rt()
    await stack.add_worker(extra=[rt])
    await stack.wait_workers(1, "rt")
    return stack, rt


def _url(stack: Stack, query: str = "model=rt") -> str:
    return f"ws://127.0.0.1:{stack.http_port}/v1/realtime?{query}"


def _auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}


async def _open(stack: Stack, query: str = "model=rt", **kw: Any) -> ClientConnection:
    """Connected, and past `session.started`."""
    kw.setdefault("additional_headers", _auth(stack))
    ws = await connect(_url(stack, query), **kw)
    started = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert started["type"] == "session.started" and started["model"] == "rt" and started["request_id"]
    return ws


async def _refused(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
    """The HTTP answer to an upgrade that is refused before the 101."""
    with pytest.raises(InvalidStatus) as err:
        await connect(url, additional_headers=headers or {})
    resp = err.value.response
    assert resp.headers["content-type"] == "application/json" and resp.headers["x-request-id"]
    return resp.status_code, json.loads(resp.body)["error"], resp.headers


async def _closed(ws: ClientConnection, timeout: float = 5) -> tuple[int, str, list[Any]]:
    """Read until the server closes; (its close code, reason, the messages read before)."""
    got: list[Any] = []
    try:
        while True:
            got.append(await asyncio.wait_for(ws.recv(), timeout))
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, exc
        return exc.rcvd.code, exc.rcvd.reason, got


async def _until(pred: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def test_messages_round_trip_both_kinds_in_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="casola.access")

    async def main() -> None:
        stack, rt = await _stack(tmp_path)
        try:
            ws = await _open(stack, compression=None)
            sent: list[str | bytes] = []
            for i in range(60):
                msg: str | bytes = f"text {i} é" if i % 3 == 0 else bytes([i]) * (i * 997)
                sent.append(msg)
                await ws.send(msg)
            big = bytes(range(256)) * 4095  # just under 1 MiB (the default max_message)
            await ws.send(big)
            got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(61)]
            assert got == [*sent, big]  # kinds kept (str = text, bytes = binary), order kept
            assert rt.inputs[0] == b"\x01text 0 \xc3\xa9" and rt.inputs[1] == b"\x02" + b"\x01" * 997
            assert rt.payloads[0] == b"\x01\x00\x00\x00\x09text 0 \xc3\xa9"  # tag, u32 length, the bytes
            await ws.send(json.dumps({"cmd": "hello"}))
            assert json.loads(await ws.recv()) == {"cmd": "hello"}
            await ws.close()
            assert ws.close_code == 1000
            await _until(lambda: rt.ended == 1)  # the client's Close ended the stream upstream (END)
            assert rt.cancelled == 0
            await _until(lambda: not stack.ingress.realtime.sessions and stack.ingress.in_flight == 0)
        finally:
            await stack.stop()

    run_uvloop(main)
    (line,) = [r for r in caplog.records if r.name == "casola.access"]
    assert line.getMessage().startswith("GET /v1/realtime 101 ")
    assert "model=rt tenant=dev" in line.getMessage()


@pytest.mark.parametrize("cuts", [[1], [3, 4], [5], [19], [20, 1, 1], [100]], ids=str)
def test_messages_do_not_depend_on_where_the_frames_are_cut(tmp_path: Path, cuts: list[int]) -> None:
    async def main() -> list[str | bytes]:
        stack, _ = await _stack(tmp_path)
        try:
            ws = await _open(stack)
            await ws.send(json.dumps({"cmd": "pieces", "cuts": cuts}))
            return [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)]
        finally:
            await stack.stop()

    assert run_uvloop(main) == ['{"type":"one"}', b"two" * 100]


def test_auth_by_header_and_by_session_token(tmp_path: Path) -> None:
    async def main() -> None:
        stack, rt = await _stack(tmp_path)
        http = await HttpClient.connect(stack.http_port)
        try:
            status, err, _ = await _refused(_url(stack))
            assert (status, err["code"], err["type"]) == (401, "missing_api_key", "authentication_error")
            status, err, _ = await _refused(_url(stack), {"Authorization": "Bearer csk_nope.nope"})
            assert (status, err["code"]) == (401, "invalid_api_key")
            # a token minted by POST /v1/realtime/sessions (for one model), used without any header
            r = await http.request("POST", "/v1/realtime/sessions", b'{"model": "rt"}', _auth(stack))
            assert r.status == 200 and r.headers["cache-control"] == "no-store"
            minted = json.loads(r.body)
            assert minted["model"] == "rt" and minted["token"].startswith("cst_")
            assert time.time() + 50 < minted["expires_at"] <= time.time() + 60
            assert minted["url"].startswith("ws://t/v1/realtime?token=cst_") and minted["url"].endswith("&model=rt")
            token = minted["token"]
            ws = await _open(stack, f"token={token}", additional_headers={})
            await ws.send(b"\x05\x06")
            assert await ws.recv() == b"\x05\x06"
            await ws.close()
            status, err, _ = await _refused(_url(stack, f"token={token}&model=rt"))  # used once: spent
            assert (status, err["code"]) == (401, "spent_session_token")
            # bound to its model
            r = await http.request("POST", "/v1/realtime/sessions?model=rt", b"", _auth(stack))
            status, err, _ = await _refused(_url(stack, f"token={json.loads(r.body)['token']}&model=echo"))
            assert (status, err["code"]) == (403, "token_model_mismatch")
            # expired (minted two minutes ago), altered, from another ingress: 401 before the upgrade
            claims = stack.keys.verifier().verify(stack.api_key, time.time(), SCOPE_RUN)
            old, _ = stack.ingress.realtime.tokens.mint(claims, claims.tenant, time.time() - 120, "rt")
            status, err, _ = await _refused(_url(stack, f"token={old}"))
            assert (status, err["code"], err["param"]) == (401, "expired_session_token", "token")
            r = await http.request("POST", "/v1/realtime/sessions", b"", _auth(stack))
            fresh = json.loads(r.body)["token"]
            assert json.loads(r.body)["model"] is None
            status, err, _ = await _refused(_url(stack, f"token={fresh[:-3]}AAA&model=rt"))
            assert (status, err["code"]) == (401, "invalid_session_token")
            # minting needs an API key; a token is no API key
            r = await http.request("POST", "/v1/realtime/sessions", b"", {"Authorization": f"Bearer {fresh}"})
            assert r.status == 401
            r = await http.request("GET", "/v1/realtime/sessions", b"", _auth(stack))
            assert r.status == 405 and r.headers["allow"] == "POST"
            assert stack.ingress.in_flight == 0 and rt.started == 1
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


def test_refusals_before_the_upgrade_are_http_answers(tmp_path: Path) -> None:
    async def main() -> None:
        stack, _ = await _stack(tmp_path, max_inflight_per_tenant=1)
        http = await HttpClient.connect(stack.http_port)
        try:
            r = await http.request("GET", "/v1/realtime?model=rt", b"", _auth(stack))  # no Upgrade
            err = json.loads(r.body)["error"]
            assert r.status == 426 and r.headers["upgrade"] == "websocket" and err["code"] == "upgrade_required"
            assert "WebSocket" in err["message"] and r.headers["x-request-id"]
            r = await http.request("GET", "/healthz")  # the same keep-alive connection serves on
            assert r.status == 200
            status, err, _ = await _refused(_url(stack, "x=1"), _auth(stack))
            assert (status, err["code"]) == (400, "missing_model")
            status, err, _ = await _refused(f"ws://127.0.0.1:{stack.http_port}/healthz", _auth(stack))
            assert (status, err["code"]) == (400, "upgrade_not_supported")
            hdrs = {**_auth(stack), "X-Casola-Priority": "9"}
            status, err, _ = await _refused(_url(stack), hdrs)
            assert (status, err["code"], err["param"]) == (403, "permission_denied", "priority")
            # one in-flight place per open WebSocket, per tenant: the second is 429 with Retry-After
            ws = await _open(stack)
            assert stack.ingress.in_flight == 1
            status, err, headers = await _refused(_url(stack), _auth(stack))
            assert (status, err["code"]) == (429, "overloaded") and int(headers["retry-after"]) >= 1
            await ws.close()
            await _until(lambda: stack.ingress.in_flight == 0)
            ws = await _open(stack)  # its place came back
            await ws.close()
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)


@pytest.mark.parametrize(
    ("cmd", "close", "code", "kind"),
    [
        ({"cmd": "end"}, 1000, None, None),
        ({"cmd": "fail", "code": "BAD_REQUEST", "message": "bad config"}, 1008, "bad_request", "invalid_request_error"),
        ({"cmd": "fail", "code": "OVERLOADED", "retry_after_ms": 2500}, 1013, "overloaded", "rate_limit_error"),
        ({"cmd": "fail", "code": "SHUTTING_DOWN"}, 1012, "shutting_down", "server_error"),
        ({"cmd": "crash"}, 1011, "internal", "server_error"),
        ({"cmd": "badtag"}, 1011, "protocol_error", "protocol_error"),
    ],
    ids=["end", "bad-request", "overloaded", "shutting-down", "crash", "bad-tag"],
)
def test_the_upstream_ending_closes_with_the_right_code(
    tmp_path: Path, cmd: dict[str, Any], close: int, code: str | None, kind: str | None
) -> None:
    async def main() -> None:
        stack, rt = await _stack(tmp_path)
        try:
            ws = await _open(stack)
            await ws.send(json.dumps(cmd))
            got_close, reason, got = await _closed(ws)
            assert got_close == close, (reason, got)
            if code is None:
                assert got == ['{"type":"bye"}'] and reason == "the session ended"
            else:
                (event,) = [json.loads(m) for m in got]
                assert event["type"] == "error" and event["error"]["code"] == code and reason == code
                assert event["error"]["type"] == kind and set(event["error"]) >= {"message", "param", "retryable"}
                if cmd.get("retry_after_ms"):
                    assert event["error"]["retry_after_ms"] == 2500 and event["error"]["retryable"] is True
            if cmd["cmd"] == "badtag":
                await _until(lambda: rt.cancelled == 1)  # the stream is cancelled upstream
            await _until(lambda: not stack.ingress.realtime.sessions and stack.ingress.in_flight == 0)
        finally:
            await stack.stop()

    run_uvloop(main)


def test_max_message_size_closes_1009_and_cancels_upstream(tmp_path: Path) -> None:
    async def main() -> None:
        stack, rt = await _stack(tmp_path, ws_max_message=4096)
        try:
            ws = await _open(stack)
            await ws.send(b"x" * 4096)
            assert await ws.recv() == b"x" * 4096
            await ws.send(b"x" * 4097)
            code, reason, got = await _closed(ws)
            assert (code, got) == (1009, []) and "4096" in reason
            await _until(lambda: rt.cancelled == 1 and stack.ingress.in_flight == 0)
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_client_that_stops_reading_is_dropped_with_bounded_memory(tmp_path: Path) -> None:
    async def main() -> None:
        limit = 256 * 1024
        stack, rt = await _stack(tmp_path, ws_max_unread=limit)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # a small window: the ingress holds the rest
        sock.connect(("127.0.0.1", stack.http_port))
        try:
            ws = await _open(stack, sock=sock, ping_interval=None)
            ws.transport.pause_reading()  # the client reads nothing from here on
            await ws.send(json.dumps({"cmd": "flood", "n": 2000, "size": 65536}))  # 128 MiB if it all went out
            (session,) = stack.ingress.realtime.sessions
            peak = 0
            while stack.ingress.realtime.sessions:
                peak = max(peak, session.ws.write_buffered)
                await asyncio.sleep(0.002)
            assert peak <= limit + 65536 + 16  # the limit, plus the message that crossed it
            await _until(lambda: rt.cancelled == 1)  # the worker saw CANCEL
            assert rt.flooded < 2000
            assert stack.ingress.in_flight == 0
            ws.transport.resume_reading()
            with pytest.raises(ConnectionClosed) as err:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert err.value.rcvd is None  # aborted: no Close frame (1006)
        finally:
            sock.close()
            await stack.stop()

    run_uvloop(main)


def test_a_client_that_answers_no_ping_is_closed_1011(tmp_path: Path) -> None:
    async def main() -> None:
        stack, rt = await _stack(tmp_path, ws_ping_interval=0.2, ws_ping_timeout=0.3)
        try:
            ws = await _open(stack, ping_interval=None)
            await asyncio.sleep(0.5)
            assert stack.ingress.realtime.sessions  # it answers pings: kept
            ws.transport.pause_reading()  # now it does not
            await _until(lambda: rt.cancelled == 1, 3)
            assert not stack.ingress.realtime.sessions and stack.ingress.in_flight == 0
            ws.transport.resume_reading()
            code, reason, _ = await _closed(ws)
            assert (code, reason) == (1011, "keepalive ping timeout")
        finally:
            await stack.stop()

    run_uvloop(main)


def test_connection_loss_cancels_upstream_and_http_is_unaffected(tmp_path: Path) -> None:
    async def main() -> None:
        stack, rt = await _stack(tmp_path)
        http = await HttpClient.connect(stack.http_port)
        try:
            sessions = [await _open(stack) for _ in range(3)]
            for i in range(20):  # keep-alive HTTP on another connection while the sessions stream
                for ws in sessions:
                    await ws.send(b"%d" % i)
                r = await http.request("POST", "/v1/run/echo", b"body %d" % i, _auth(stack))
                assert (r.status, r.body) == (200, b"body %d" % i)
                for ws in sessions:
                    assert await ws.recv() == b"%d" % i
            assert stack.ingress.in_flight == 3
            sessions[0].transport.abort()  # lost, no Close: CANCEL upstream
            await _until(lambda: rt.cancelled == 1 and stack.ingress.in_flight == 2)
            await sessions[1].close()  # a Close: END upstream
            await _until(lambda: rt.ended == 1 and stack.ingress.in_flight == 1)
            await sessions[2].send(b"still")
            assert await sessions[2].recv() == b"still"
            r = await http.request("GET", "/healthz")
            assert r.status == 200
            await stack.ingress.stop()  # the ingress stops: the client is told to reconnect (1012)
            code, _, _ = await _closed(sessions[2])
            assert code == 1012
            await _until(lambda: rt.cancelled == 2)
        finally:
            await http.close()
            await stack.upstream.stop()
            await stack.node.stop()
            for w in stack.workers:
                await w.stop()

    run_uvloop(main)


def test_a_revoked_key_ends_its_open_sessions(tmp_path: Path) -> None:
    async def main() -> None:
        stack, rt = await _stack(tmp_path)
        try:
            ws = await _open(stack)
            claims = stack.keys.verifier().verify(stack.api_key, time.time(), SCOPE_RUN)
            stack.keys.revoke(claims.kid)
            code, reason, got = await _closed(ws, 3)
            assert (code, reason) == (1008, "revoked_api_key")
            assert json.loads(got[-1])["error"]["code"] == "revoked_api_key"
            await _until(lambda: rt.cancelled == 1 and stack.ingress.in_flight == 0)
        finally:
            await stack.stop()

    run_uvloop(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_wss_on_the_tls_listener(tmp_path: Path, loop: str) -> None:
    """The hand-over works on a TLS transport too (asyncio's and uvloop's SSL protocols)."""
    certs = make_dev_certs(tmp_path / "certs")

    async def main() -> None:
        stack, _ = await _stack(tmp_path, tls_cert=str(certs.cert), tls_key=str(certs.key))
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        try:
            url = f"wss://127.0.0.1:{stack.http_port}/v1/realtime?model=rt"
            ws = await connect(url, ssl=ctx, additional_headers=_auth(stack))
            assert json.loads(await ws.recv())["type"] == "session.started"
            for msg in ["t", b"\x00" * 100_000, "é"]:
                await ws.send(msg)
                assert await ws.recv() == msg
            await ws.close()
            assert ws.close_code == 1000
        finally:
            await stack.stop()

    if loop == "uvloop":
        run_uvloop(main)
    else:
        asyncio.run(asyncio.wait_for(main(), 60))


def test_one_tenant_cannot_hold_every_session(tmp_path: Path) -> None:
    """Each session holds its worker's slot while it lasts: past its limit a tenant's next one is a
    retryable 429 before the upgrade, and another tenant still connects."""
    from casola.auth import SCOPE_RUN

    async def main() -> None:
        stack, _rt = await _stack(tmp_path, ws_max_sessions_per_tenant=2)
        other = {"Authorization": f"Bearer {stack.keys.ensure_key('other', 'other', [SCOPE_RUN], 'tests')}"}
        try:
            mine = [await _open(stack) for _ in range(2)]
            status, err, headers = await _refused(_url(stack), _auth(stack))
            assert status == 429 and err["code"] == "overloaded" and int(headers["retry-after"]) >= 1
            theirs = await _open(stack, additional_headers=other)
            await mine[0].close()
            await _until(lambda: len(stack.ingress.realtime.sessions) == 2)
            again = await _open(stack)  # a place came free
            for ws in (*mine[1:], theirs, again):
                await ws.close()
        finally:
            await stack.stop()

    run_uvloop(main)
