"""Webhook signing, verification, body shape and delivery against a real loopback HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from casola.queue.webhooks import (
    H_KEY_ID,
    H_REQUEST_ID,
    H_SIGNATURE,
    H_TIMESTAMP,
    WebhookSender,
    WebhookSigner,
    WebhookVerifyError,
    load_public_key,
    public_key_id,
    public_key_path,
    verify_webhook,
    webhook_body,
)

WAIT = 3.0  # seconds any one test may wait for deliveries to finish


@dataclass
class Received:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic()


class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 answering each request from a script, then 200.

    A script entry is (status, extra headers), or "hang" to never answer (until the receiver stops).
    One request per connection (it answers `connection: close`).
    """

    def __init__(self, script: list[tuple[int, dict[str, str]] | str] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[Received] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=secret"

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._closing.set()
        self._server.close()
        await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=WAIT)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            method, target, _version = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                if line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Received(method, target, headers, body, time.monotonic()))
            action = self.script.pop(0) if self.script else (200, {})
            if action == "hang":
                await self._closing.wait()
                return
            assert isinstance(action, tuple)
            status, extra = action
            lines_out = [f"HTTP/1.1 {status} Whatever", "content-length: 2", "connection: close"]
            lines_out += [f"{k}: {v}" for k, v in extra.items()]
            writer.write(("\r\n".join(lines_out) + "\r\n\r\nok").encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)


class Results:
    """Collects on_result calls; `finished(rid)` waits until next_at is None for `rid`."""

    def __init__(self, *, awaitable: bool = False) -> None:
        self.calls: list[tuple[str, bool, int, float | None]] = []
        self._done: dict[str, asyncio.Event] = {}
        self.awaitable = awaitable

    def _event(self, rid: str) -> asyncio.Event:
        return self._done.setdefault(rid, asyncio.Event())

    def _record(self, rid: str, delivered: bool, attempts: int, next_at: float | None) -> None:
        self.calls.append((rid, delivered, attempts, next_at))
        if next_at is None:
            self._event(rid).set()

    def __call__(self, rid: str, delivered: bool, attempts: int, next_at: float | None) -> Any:
        if not self.awaitable:
            self._record(rid, delivered, attempts, next_at)
            return None

        async def later() -> None:
            await asyncio.sleep(0)
            self._record(rid, delivered, attempts, next_at)

        return later()

    async def finished(self, rid: str) -> None:
        await asyncio.wait_for(self._event(rid).wait(), WAIT)

    def of(self, rid: str) -> list[tuple[bool, int, float | None]]:
        return [(d, n, t) for r, d, n, t in self.calls if r == rid]


@pytest.fixture
def signer() -> WebhookSigner:
    return WebhookSigner(Ed25519PrivateKey.generate())


@contextlib.asynccontextmanager
async def sending(signer: WebhookSigner, results: Results, **kw: Any) -> Any:
    kw.setdefault("base_delay", 0.01)
    kw.setdefault("timeout", 2.0)
    sender = WebhookSender(signer, on_result=results, **kw)
    sender.start()
    try:
        yield sender
    finally:
        await sender.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- delivery


@pytest.mark.asyncio
async def test_delivers_signed_body(signer: WebhookSigner) -> None:
    results = Results()
    body = webhook_body("req-1", True, b'{"images": [{"url": "u"}]}', "application/json")
    async with Receiver() as rx, sending(signer, results) as sender:
        assert sender.submit(rx.url, "req-1", body)
        await results.finished("req-1")
        assert sender.pending == 0
    assert results.of("req-1") == [(True, 1, None)]
    [got] = rx.requests
    assert (got.method, got.target, got.body) == ("POST", "/hook?token=secret", body)
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"].startswith("casola-webhooks/")
    assert verify_webhook(got.headers, got.body, [signer.public_key], now=time.time()) == "req-1"
    assert verify_webhook(got.headers, got.body, {signer.key_id: signer.public_key}, now=time.time()) == "req-1"
    assert json.loads(got.body)["payload"] == {"images": [{"url": "u"}]}


@pytest.mark.asyncio
async def test_retries_503_then_delivers(signer: WebhookSigner) -> None:
    results = Results(awaitable=True)
    async with Receiver([(503, {}), (503, {})]) as rx, sending(signer, results, max_attempts=5) as sender:
        before = time.time()
        assert sender.submit(rx.url, "req-2", b"{}")
        await results.finished("req-2")
    calls = results.of("req-2")
    assert [(d, n) for d, n, _ in calls] == [(False, 1), (False, 2), (True, 3)]
    assert all(t is not None and before <= t <= time.time() + 1 for _, _, t in calls[:2])
    assert calls[-1][2] is None
    assert len(rx.requests) == 3
    for r in rx.requests:  # every attempt is signed afresh and verifies
        assert verify_webhook(r.headers, r.body, [signer.public_key], now=time.time()) == "req-2"


@pytest.mark.asyncio
async def test_4xx_is_permanent(signer: WebhookSigner) -> None:
    results = Results()
    async with Receiver([(400, {}), (200, {})]) as rx, sending(signer, results) as sender:
        assert sender.submit(rx.url, "req-3", b"{}")
        await results.finished("req-3")
        await asyncio.sleep(0.05)  # no retry comes
        assert not sender.is_pending("req-3")
    assert results.of("req-3") == [(False, 1, None)]
    assert len(rx.requests) == 1


@pytest.mark.asyncio
async def test_redirect_not_followed(signer: WebhookSigner) -> None:
    results = Results()
    async with Receiver([(307, {"location": "http://127.0.0.1:1/elsewhere"})]) as rx, sending(signer, results) as s:
        assert s.submit(rx.url, "req-r", b"{}")
        await results.finished("req-r")
    assert results.of("req-r") == [(False, 1, None)]
    assert len(rx.requests) == 1


@pytest.mark.asyncio
async def test_retry_after_honoured_and_capped(signer: WebhookSigner) -> None:
    results = Results()
    script: list[tuple[int, dict[str, str]] | str] = [(503, {"retry-after": "0.2"}), (429, {"retry-after": "100"})]
    async with Receiver(script) as rx, sending(signer, results, max_delay=0.3) as sender:
        assert sender.submit(rx.url, "req-4", b"{}")
        await results.finished("req-4")
    first, second, third = rx.requests
    assert second.at - first.at >= 0.19  # Retry-After: 0.2, although backoff would be < 0.01
    assert 0.29 <= third.at - second.at < 2.0  # Retry-After: 100, capped at max_delay
    calls = results.of("req-4")
    assert [(d, n) for d, n, _ in calls] == [(False, 1), (False, 2), (True, 3)]


@pytest.mark.asyncio
async def test_timeout_is_retried(signer: WebhookSigner) -> None:
    results = Results()
    async with Receiver(["hang"]) as rx, sending(signer, results, timeout=0.2) as sender:
        assert sender.submit(rx.url, "req-t", b"{}")
        await results.finished("req-t")
    assert [(d, n) for d, n, _ in results.of("req-t")] == [(False, 1), (True, 2)]


@pytest.mark.asyncio
async def test_unreachable_gives_up_after_max_attempts(signer: WebhookSigner) -> None:
    results = Results()
    url = f"http://127.0.0.1:{_free_port()}/hook"
    async with sending(signer, results, max_attempts=3) as sender:
        assert sender.submit(url, "req-5", b"{}")
        await results.finished("req-5")
        assert sender.pending == 0
    calls = results.of("req-5")
    assert [(d, n) for d, n, _ in calls] == [(False, 1), (False, 2), (False, 3)]
    assert calls[0][2] is not None and calls[1][2] is not None and calls[2][2] is None


@pytest.mark.asyncio
async def test_resume_counts_earlier_attempts(signer: WebhookSigner) -> None:
    results = Results()
    url = f"http://127.0.0.1:{_free_port()}/hook"
    async with sending(signer, results, max_attempts=3) as sender:
        assert sender.submit(url, "req-6", b"{}", attempts_so_far=2, not_before=time.time() + 0.05)
        await results.finished("req-6")
    assert results.of("req-6") == [(False, 3, None)]


@pytest.mark.asyncio
async def test_bounded_and_deduplicated(signer: WebhookSigner) -> None:
    results = Results()
    sender = WebhookSender(signer, max_pending=2, base_delay=0.01, on_result=results)
    try:
        async with Receiver() as rx:
            assert sender.submit(rx.url, "a", b'{"n": 1}')
            assert sender.submit(rx.url, "a", b'{"n": 2}')  # already pending: not queued twice
            assert sender.pending == 1
            assert sender.submit(rx.url, "b", b"{}")
            assert not sender.submit(rx.url, "c", b"{}")  # full
            assert sender.pending == 2
            sender.start()
            await results.finished("a")
            await results.finished("b")
            assert sender.pending == 0
            assert sender.submit(rx.url, "c", b"{}")  # room again
            await results.finished("c")
        assert sorted(r.headers[H_REQUEST_ID.lower()] for r in rx.requests) == ["a", "b", "c"]
        assert next(r.body for r in rx.requests if r.headers[H_REQUEST_ID.lower()] == "a") == b'{"n": 1}'
    finally:
        await sender.stop()
    assert not sender.submit("http://127.0.0.1:1/", "d", b"{}")  # stopped


@pytest.mark.asyncio
async def test_stop_is_prompt_with_deliveries_backing_off(signer: WebhookSigner) -> None:
    results = Results()
    url = f"http://127.0.0.1:{_free_port()}/hook"
    async with sending(signer, results, base_delay=60.0, max_delay=60.0) as sender:
        for i in range(5):
            assert sender.submit(url, f"s{i}", b"{}")
        await asyncio.sleep(0.1)
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    assert sender.pending == 0


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "example.com/hook", "http:///x", ""])
def test_submit_refuses_non_http_urls(signer: WebhookSigner, url: str) -> None:
    sender = WebhookSender(signer)
    with pytest.raises(ValueError):
        sender.submit(url, "r", b"{}")
    assert sender.pending == 0


# ------------------------------------------------------------------------------------------ verification


def _signed(signer: WebhookSigner, body: bytes = b'{"x":1}', ts: int | None = None) -> dict[str, str]:
    return signer.sign("req-v", int(time.time()) if ts is None else ts, body)


def test_verify_accepts_lowercase_headers(signer: WebhookSigner) -> None:
    headers = {k.lower(): v for k, v in _signed(signer).items()}
    assert verify_webhook(headers, b'{"x":1}', [signer.public_key], now=time.time()) == "req-v"


def test_verify_rejects_tampered_body(signer: WebhookSigner) -> None:
    with pytest.raises(WebhookVerifyError, match="bad signature"):
        verify_webhook(_signed(signer), b'{"x":2}', [signer.public_key], now=time.time())


def test_verify_rejects_tampered_request_id(signer: WebhookSigner) -> None:
    headers = {**_signed(signer), H_REQUEST_ID: "req-other"}
    with pytest.raises(WebhookVerifyError, match="bad signature"):
        verify_webhook(headers, b'{"x":1}', [signer.public_key], now=time.time())


def test_verify_rejects_wrong_key(signer: WebhookSigner) -> None:
    other = WebhookSigner(Ed25519PrivateKey.generate())
    with pytest.raises(WebhookVerifyError, match="unknown key id"):
        verify_webhook(_signed(signer), b'{"x":1}', [other.public_key], now=time.time())
    forged = {signer.key_id: other.public_key}  # a key filed under the signer's id still fails
    with pytest.raises(WebhookVerifyError, match="bad signature"):
        verify_webhook(_signed(signer), b'{"x":1}', forged, now=time.time())


def test_verify_rejects_stale_and_future_timestamps(signer: WebhookSigner) -> None:
    now = time.time()
    with pytest.raises(WebhookVerifyError, match="too old"):
        verify_webhook(_signed(signer, ts=int(now) - 301), b'{"x":1}', [signer.public_key], now=now)
    with pytest.raises(WebhookVerifyError, match="future"):
        verify_webhook(_signed(signer, ts=int(now) + 302), b'{"x":1}', [signer.public_key], now=now)
    old = _signed(signer, ts=int(now) - 1000)
    assert verify_webhook(old, b'{"x":1}', [signer.public_key], now=now, tolerance_s=2000) == "req-v"


@pytest.mark.parametrize("header", [H_REQUEST_ID, H_TIMESTAMP, H_KEY_ID, H_SIGNATURE])
def test_verify_rejects_missing_header(signer: WebhookSigner, header: str) -> None:
    headers = {k: v for k, v in _signed(signer).items() if k != header}
    with pytest.raises(WebhookVerifyError, match=f"missing header {header}"):
        verify_webhook(headers, b'{"x":1}', [signer.public_key], now=time.time())


@pytest.mark.parametrize(("header", "value", "match"), [(H_TIMESTAMP, "12.5", "not unix"), (H_SIGNATURE, "zz", "hex")])
def test_verify_rejects_malformed_headers(signer: WebhookSigner, header: str, value: str, match: str) -> None:
    headers = {**_signed(signer), header: value}
    with pytest.raises(WebhookVerifyError, match=match):
        verify_webhook(headers, b'{"x":1}', [signer.public_key], now=time.time())


def test_sign_refuses_newlines_in_request_id(signer: WebhookSigner) -> None:
    with pytest.raises(ValueError):
        signer.sign("a\nb", 1, b"")


# -------------------------------------------------------------------------------------------- body shape


def test_body_embeds_json_result_unchanged() -> None:
    result = b'{"images": [{"url": "https://x/y.png", "width": 1024}], "seed": 196619188014358660}'
    body = webhook_body("r1", True, result, "application/json")
    assert result in body  # embedded byte for byte, not re-encoded
    doc = json.loads(body)
    assert doc == {
        "request_id": "r1",
        "gateway_request_id": "r1",
        "status": "OK",
        "payload": json.loads(result),
        "error": None,
    }


def test_body_json_detected_without_content_type() -> None:
    assert json.loads(webhook_body("r", True, b"[1, 2]", ""))["payload"] == [1, 2]
    assert json.loads(webhook_body("r", True, memoryview(b'{"a": 1}'), ""))["payload"] == {"a": 1}


@pytest.mark.parametrize("result", [b"\x89PNG\r\n\x1a\n....", b'{"a": ', b'"\xff"'])
def test_body_non_json_result(result: bytes) -> None:
    doc = json.loads(webhook_body("r2", True, result, "image/png"))
    assert doc["status"] == "OK" and doc["payload"] is None
    assert "not JSON" in doc["payload_error"]
    assert doc["result_content_type"] == "image/png"


def test_body_error() -> None:
    doc = json.loads(webhook_body("r3", False, None, "", error="worker crashed", error_type="WORKER_FAILED"))
    assert doc == {
        "request_id": "r3",
        "gateway_request_id": "r3",
        "status": "ERROR",
        "payload": None,
        "error": "worker crashed",
        "error_type": "WORKER_FAILED",
    }


def test_body_error_with_json_details() -> None:
    doc = json.loads(webhook_body("r4", False, b'{"detail": "bad prompt"}', "application/json", error="invalid"))
    assert (doc["status"], doc["error"], doc["payload"]) == ("ERROR", "invalid", {"detail": "bad prompt"})


# ------------------------------------------------------------------------------------------------- keys


def test_load_or_create_writes_key_and_public_pem(tmp_path: Path) -> None:
    path = tmp_path / "webhook.pem"
    first = WebhookSigner.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    pub_path = public_key_path(path)
    assert pub_path == tmp_path / "webhook.pub.pem"
    assert pub_path.read_bytes() == first.public_pem()
    assert public_key_id(load_public_key(pub_path.read_bytes())) == first.key_id
    assert len(first.key_id) == 16
    pub_path.unlink()
    again = WebhookSigner.load_or_create(path)
    assert again.key_id == first.key_id
    assert pub_path.read_bytes() == first.public_pem()  # rewritten when missing
    headers = again.sign("r", int(time.time()), b"x")
    assert verify_webhook(headers, b"x", [load_public_key(pub_path.read_bytes())], now=time.time()) == "r"


def test_load_or_create_refuses_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(ValueError, match="not an Ed25519"):
        WebhookSigner.load_or_create(path)
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not an unencrypted PEM"):
        WebhookSigner.load_or_create(tmp_path / "junk.pem")
    with pytest.raises(ValueError):
        load_public_key(b"junk")
