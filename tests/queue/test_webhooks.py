"""Webhook signing (Standard Webhooks, v1a), verification, body shape, and delivery against a real
loopback HTTP receiver: retries, the outbound address policy, logs without secrets, fairness."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from casola.net.outbound import OutboundPolicy
from casola.queue.webhooks import (
    H_ID,
    H_SIGNATURE,
    H_TIMESTAMP,
    WebhookSender,
    WebhookSigner,
    WebhookVerifyError,
    encode_public_key,
    load_public_key,
    parse_public_key,
    public_key_path,
    public_whpk_path,
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

    def __init__(
        self, script: list[tuple[int, dict[str, str]] | str] | None = None, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.script = list(script or [])
        self.tls = tls
        self.requests: list[Received] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=secret"

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
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
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
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


LOOPBACK = OutboundPolicy(["127.0.0.0/8"])  # the receivers here are on loopback


@contextlib.asynccontextmanager
async def sending(signer: WebhookSigner, results: Results, **kw: Any) -> Any:
    kw.setdefault("base_delay", 0.01)
    kw.setdefault("timeout", 2.0)
    kw.setdefault("policy", LOOPBACK)
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
        before = int(time.time())
        assert sender.submit(rx.url, "req-1", body, tenant="t")
        await results.finished("req-1")
        assert sender.pending == 0
    assert results.of("req-1") == [(True, 1, None)]
    [got] = rx.requests
    assert (got.method, got.target, got.body) == ("POST", "/hook?token=secret", body)
    assert got.headers["host"] == f"127.0.0.1:{rx.port}"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"].startswith("casola-webhooks/")
    assert not [h for h in got.headers if h.startswith("x-casola-webhook")]  # the old scheme is gone
    # Standard Webhooks, checked by hand from the spec: v1a = Ed25519 over "{id}.{timestamp}.{body}"
    assert got.headers["webhook-id"] == "req-1"
    assert before <= int(got.headers["webhook-timestamp"]) <= time.time()
    version, sig = got.headers["webhook-signature"].split(",")
    assert version == "v1a"
    signer.public_key.verify(base64.b64decode(sig), b"req-1." + got.headers["webhook-timestamp"].encode() + b"." + body)
    assert verify_webhook(got.headers, got.body, [signer.public_key], now=time.time()) == "req-1"
    assert verify_webhook(got.headers, got.body, [signer.public_whpk()], now=time.time()) == "req-1"
    assert json.loads(got.body)["payload"] == {"images": [{"url": "u"}]}


@pytest.mark.asyncio
async def test_retries_503_then_delivers(signer: WebhookSigner) -> None:
    results = Results(awaitable=True)
    async with Receiver([(503, {}), (503, {})]) as rx, sending(signer, results, max_attempts=5) as sender:
        before = time.time()
        assert sender.submit(rx.url, "req-2", b"{}", tenant="t")
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
        assert sender.submit(rx.url, "req-3", b"{}", tenant="t")
        await results.finished("req-3")
        await asyncio.sleep(0.05)  # no retry comes
        assert not sender.is_pending("req-3")
    assert results.of("req-3") == [(False, 1, None)]
    assert len(rx.requests) == 1


@pytest.mark.asyncio
async def test_redirect_not_followed(signer: WebhookSigner) -> None:
    results = Results()
    async with Receiver([(307, {"location": "http://127.0.0.1:1/elsewhere"})]) as rx, sending(signer, results) as s:
        assert s.submit(rx.url, "req-r", b"{}", tenant="t")
        await results.finished("req-r")
    assert results.of("req-r") == [(False, 1, None)]
    assert len(rx.requests) == 1


@pytest.mark.asyncio
async def test_retry_after_honoured_and_capped(signer: WebhookSigner) -> None:
    results = Results()
    script: list[tuple[int, dict[str, str]] | str] = [(503, {"retry-after": "0.2"}), (429, {"retry-after": "100"})]
    async with Receiver(script) as rx, sending(signer, results, max_delay=0.3) as sender:
        assert sender.submit(rx.url, "req-4", b"{}", tenant="t")
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
        assert sender.submit(rx.url, "req-t", b"{}", tenant="t")
        await results.finished("req-t")
    assert [(d, n) for d, n, _ in results.of("req-t")] == [(False, 1), (True, 2)]


@pytest.mark.asyncio
async def test_unreachable_gives_up_after_max_attempts(signer: WebhookSigner) -> None:
    results = Results()
    url = f"http://127.0.0.1:{_free_port()}/hook"
    async with sending(signer, results, max_attempts=3) as sender:
        assert sender.submit(url, "req-5", b"{}", tenant="t")
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
        assert sender.submit(url, "req-6", b"{}", attempts_so_far=2, not_before=time.time() + 0.05, tenant="t")
        await results.finished("req-6")
    assert results.of("req-6") == [(False, 3, None)]


@pytest.mark.asyncio
async def test_bounded_and_deduplicated(signer: WebhookSigner) -> None:
    results = Results()
    sender = WebhookSender(signer, policy=LOOPBACK, max_pending=2, base_delay=0.01, on_result=results)
    try:
        async with Receiver() as rx:
            assert sender.submit(rx.url, "a", b'{"n": 1}', tenant="t")
            assert sender.submit(rx.url, "a", b'{"n": 2}', tenant="t")  # already pending: not queued twice
            assert sender.pending == 1
            assert sender.submit(rx.url, "b", b"{}", tenant="t")
            assert not sender.submit(rx.url, "c", b"{}", tenant="t")  # full
            assert sender.pending == 2
            sender.start()
            await results.finished("a")
            await results.finished("b")
            assert sender.pending == 0
            assert sender.submit(rx.url, "c", b"{}", tenant="t")  # room again
            await results.finished("c")
        assert sorted(r.headers[H_ID] for r in rx.requests) == ["a", "b", "c"]
        assert next(r.body for r in rx.requests if r.headers[H_ID] == "a") == b'{"n": 1}'
    finally:
        await sender.stop()
    assert not sender.submit("http://127.0.0.1:1/", "d", b"{}", tenant="t")  # stopped


@pytest.mark.asyncio
async def test_stop_is_prompt_with_deliveries_backing_off(signer: WebhookSigner) -> None:
    results = Results()
    url = f"http://127.0.0.1:{_free_port()}/hook"
    async with sending(signer, results, base_delay=60.0, max_delay=60.0) as sender:
        for i in range(5):
            assert sender.submit(url, f"s{i}", b"{}", tenant="t")
        await asyncio.sleep(0.1)
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    assert sender.pending == 0


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "example.com/hook", "http:///x", ""])
def test_submit_refuses_non_http_urls(signer: WebhookSigner, url: str) -> None:
    sender = WebhookSender(signer)
    with pytest.raises(ValueError):
        sender.submit(url, "r", b"{}", tenant="t")
    assert sender.pending == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://2130706433/hook",
        "http://0x7f.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://169.254.169.254/hook",
        "http://10.1.2.3/hook",
        "http://localhost:8080/hook",
    ],
)
def test_submit_refuses_non_public_address_literals(signer: WebhookSigner, url: str) -> None:
    sender = WebhookSender(signer)  # no allow-list
    with pytest.raises(ValueError, match="refused") as err:
        sender.submit(url.replace("://", "://us3r:pa55@") + "?t0k3n=1", "r", b"{}", tenant="t")
    assert not any(s in str(err.value) for s in ("us3r", "pa55", "/hook", "t0k3n"))
    assert sender.pending == 0


@pytest.mark.asyncio
async def test_a_name_resolving_to_a_refused_address_fails_for_good(
    signer: WebhookSigner, caplog: pytest.LogCaptureFixture
) -> None:
    async def rebinding(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # a public-looking name that points inside

    results = Results()
    async with Receiver() as rx, sending(signer, results, policy=OutboundPolicy(), resolver=rebinding) as sender:
        assert sender.submit(f"http://hook.test:{rx.port}/hook?t0k3n=1", "req-n", b"{}", tenant="t")
        await results.finished("req-n")
    assert results.of("req-n") == [(False, 1, None)]  # not retried
    assert rx.requests == []
    [line] = [r.getMessage() for r in caplog.records if r.name == "casola.webhooks"]
    assert "hook.test" in line and "loopback" in line and "not retryable" in line and "t0k3n" not in line


@pytest.mark.asyncio
async def test_no_log_line_holds_user_info_path_or_query(
    signer: WebhookSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at every level (ours, httpcore's, anyio's): delivered, retried, refused, unreachable."""
    caplog.set_level(logging.DEBUG)
    names = {"hook.test": ["127.0.0.1"], "inside.test": ["10.0.0.7"]}

    async def resolve(host: str, port: int) -> list[str]:
        return names.get(host, [host])

    results = Results()
    async with (
        Receiver([(503, {}), (200, {})]) as rx,
        sending(signer, results, resolver=resolve, max_attempts=2) as sender,
    ):
        assert sender.submit(f"http://us3r:pa55@hook.test:{rx.port}/p4th?t0k3n=1", "ok", b"{}", tenant="t")
        assert sender.submit("https://us3r:pa55@inside.test/p4th?t0k3n=1", "inside", b"{}", tenant="t")
        down = f"http://us3r:pa55@127.0.0.1:{_free_port()}/p4th?t0k3n=1"
        assert sender.submit(down, "down", b"{}", tenant="t")
        with pytest.raises(ValueError) as err:
            sender.submit("http://us3r:pa55@10.1.2.3/p4th?t0k3n=1", "literal", b"{}", tenant="t")
        for rid in ("ok", "inside", "down"):
            await results.finished(rid)
    assert [d for d, _, _ in results.of("ok")] == [False, True]
    assert rx.requests[-1].target == "/p4th?t0k3n=1"
    assert rx.requests[-1].headers["authorization"] == "Basic " + base64.b64encode(b"us3r:pa55").decode()
    assert any(r.name.startswith("httpcore") for r in caplog.records)  # the library's lines are covered
    for text in [r.getMessage() for r in caplog.records] + [str(err.value)]:
        assert not any(s in text for s in ("us3r", "pa55", "p4th", "t0k3n")), text


# ---------------------------------------------------------------------------------------------- fairness


@pytest.mark.asyncio
async def test_one_tenants_hanging_receivers_do_not_delay_another_tenants_webhook(signer: WebhookSigner) -> None:
    """Tenant A's 40 deliveries go to a receiver that accepts and never answers (each attempt waits out
    the 10 s timeout); tenant B's one webhook to a healthy receiver still arrives at once."""
    results = Results()
    async with (
        Receiver(["hang"] * 40) as stuck,
        Receiver() as healthy,
        sending(signer, results, timeout=10.0, concurrency=16, per_tenant=4) as sender,
    ):
        for i in range(40):
            assert sender.submit(stuck.url, f"a{i}", b"{}", tenant="A")
        for _ in range(200):
            if len(stuck.requests) >= 4:
                break
            await asyncio.sleep(0.01)
        started = time.monotonic()
        assert sender.submit(healthy.url, "b", b"{}", tenant="B")
        await results.finished("b")
        took = time.monotonic() - started
        await asyncio.sleep(0.1)
        assert len(stuck.requests) == 4  # A holds its share of the workers, never more
    assert results.of("b") == [(True, 1, None)]
    assert took < 1.0, took


@pytest.mark.asyncio
async def test_ready_deliveries_are_taken_round_robin_across_tenants(signer: WebhookSigner) -> None:
    results = Results()
    sender = WebhookSender(signer, policy=LOOPBACK, concurrency=1, base_delay=0.01, on_result=results)
    try:
        async with Receiver() as rx:
            for rid, tenant in [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("c1", "C")]:
                assert sender.submit(rx.url, rid, b"{}", tenant=tenant)
            sender.start()
            for rid in ("a1", "a2", "a3", "b1", "c1"):
                await results.finished(rid)
        assert [r.headers[H_ID] for r in rx.requests] == ["a1", "b1", "c1", "a2", "a3"]
    finally:
        await sender.stop()


def test_one_tenant_fills_only_its_share_of_pending(signer: WebhookSigner) -> None:
    sender = WebhookSender(signer, policy=LOOPBACK, max_pending=10, max_pending_per_tenant=3)
    url = "http://127.0.0.1:1/"
    assert all(sender.submit(url, f"a{i}", b"{}", tenant="A") for i in range(3))
    assert not sender.submit(url, "a3", b"{}", tenant="A")  # A's share is full
    assert sender.submit(url, "b0", b"{}", tenant="B")  # B still gets in
    assert sender.pending == 4
    with pytest.raises(ValueError):
        WebhookSender(signer, per_tenant=0)


# ------------------------------------------------------------------------------------------ verification


def _signed(signer: WebhookSigner, body: bytes = b'{"x":1}', ts: int | None = None) -> dict[str, str]:
    return signer.sign("req-v", int(time.time()) if ts is None else ts, body)


def test_signature_matches_the_spec_by_hand() -> None:
    """The spec's example id and timestamp; the signature computed here from the spec's recipe."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    body = b'{"type":"contact.created","timestamp":"2022-11-03T20:26:10.344522Z","data":{"id":"1f81"}}'
    headers = WebhookSigner(key).sign("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", 1674087231, body)
    content = b"msg_2KWPBgLlAfxdpx2AI54pPJ85f4W.1674087231." + body
    expected = "v1a," + base64.b64encode(key.sign(content)).decode()  # Ed25519 is deterministic
    assert headers == {
        "webhook-id": "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
        "webhook-timestamp": "1674087231",
        "webhook-signature": expected,
    }
    assert (H_ID, H_TIMESTAMP, H_SIGNATURE) == ("webhook-id", "webhook-timestamp", "webhook-signature")


def test_verify_accepts_any_header_case(signer: WebhookSigner) -> None:
    headers = {k.upper(): v for k, v in _signed(signer).items()}
    assert verify_webhook(headers, b'{"x":1}', [signer.public_key], now=time.time()) == "req-v"


def test_verify_rejects_tampered_body(signer: WebhookSigner) -> None:
    with pytest.raises(WebhookVerifyError, match="bad signature"):
        verify_webhook(_signed(signer), b'{"x":2}', [signer.public_key], now=time.time())


def test_verify_rejects_tampered_id_and_timestamp(signer: WebhookSigner) -> None:
    headers = _signed(signer)
    with pytest.raises(WebhookVerifyError, match="bad signature"):
        verify_webhook({**headers, H_ID: "req-other"}, b'{"x":1}', [signer.public_key], now=time.time())
    later = str(int(headers[H_TIMESTAMP]) + 1)
    with pytest.raises(WebhookVerifyError, match="bad signature"):
        verify_webhook({**headers, H_TIMESTAMP: later}, b'{"x":1}', [signer.public_key], now=time.time())


def test_verify_rejects_untrusted_keys(signer: WebhookSigner) -> None:
    other = WebhookSigner(Ed25519PrivateKey.generate())
    with pytest.raises(WebhookVerifyError, match="bad signature"):
        verify_webhook(_signed(signer), b'{"x":1}', [other.public_key], now=time.time())
    with pytest.raises(WebhookVerifyError, match="bad signature"):
        verify_webhook(_signed(signer), b'{"x":1}', [], now=time.time())
    both = [other.public_key, signer.public_whpk()]  # rotation: the receiver trusts old and new
    assert verify_webhook(_signed(signer), b'{"x":1}', both, now=time.time()) == "req-v"


def test_verify_tries_every_signature_in_the_header(signer: WebhookSigner) -> None:
    """Space-separated signatures (key rotation): unknown versions, garbage and other keys' are skipped."""
    headers = _signed(signer)
    other = WebhookSigner(Ed25519PrivateKey.generate()).sign("req-v", int(headers[H_TIMESTAMP]), b'{"x":1}')
    hmac_like = "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="
    several = " ".join([hmac_like, "v1a,!!!", other[H_SIGNATURE], headers[H_SIGNATURE]])
    assert verify_webhook({**headers, H_SIGNATURE: several}, b'{"x":1}', [signer.public_key], time.time()) == "req-v"
    with pytest.raises(WebhookVerifyError, match="no v1a signature"):
        verify_webhook({**headers, H_SIGNATURE: hmac_like}, b'{"x":1}', [signer.public_key], now=time.time())


def test_verify_rejects_stale_and_future_timestamps(signer: WebhookSigner) -> None:
    now = time.time()
    with pytest.raises(WebhookVerifyError, match="too old"):
        verify_webhook(_signed(signer, ts=int(now) - 301), b'{"x":1}', [signer.public_key], now=now)
    with pytest.raises(WebhookVerifyError, match="future"):
        verify_webhook(_signed(signer, ts=int(now) + 302), b'{"x":1}', [signer.public_key], now=now)
    old = _signed(signer, ts=int(now) - 1000)
    assert verify_webhook(old, b'{"x":1}', [signer.public_key], now=now, tolerance_s=2000) == "req-v"


@pytest.mark.parametrize("header", [H_ID, H_TIMESTAMP, H_SIGNATURE])
def test_verify_rejects_missing_header(signer: WebhookSigner, header: str) -> None:
    headers = {k: v for k, v in _signed(signer).items() if k != header}
    with pytest.raises(WebhookVerifyError, match=f"missing header {header}"):
        verify_webhook(headers, b'{"x":1}', [signer.public_key], now=time.time())


@pytest.mark.parametrize(
    ("header", "value", "match"),
    [
        (H_TIMESTAMP, "12.5", "not unix"),
        (H_TIMESTAMP, "-1", "not unix"),
        (H_SIGNATURE, "v1a,zz", "no v1a signature"),
        (H_SIGNATURE, "v1a," + base64.b64encode(b"short").decode(), "no v1a signature"),
        (H_ID, "a.b", "bad webhook-id"),
    ],
)
def test_verify_rejects_malformed_headers(signer: WebhookSigner, header: str, value: str, match: str) -> None:
    headers = {**_signed(signer), header: value}
    with pytest.raises(WebhookVerifyError, match=match):
        verify_webhook(headers, b'{"x":1}', [signer.public_key], now=time.time())


@pytest.mark.parametrize("msg_id", ["a\nb", "a.b", "", "a b", "é"])
def test_sign_refuses_ids_that_break_the_signed_content(signer: WebhookSigner, msg_id: str) -> None:
    with pytest.raises(ValueError):
        signer.sign(msg_id, 1, b"")


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


def test_load_or_create_writes_key_and_public_pem_and_whpk(tmp_path: Path) -> None:
    path = tmp_path / "webhook.pem"
    first = WebhookSigner.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    pub_path, whpk_path = public_key_path(path), public_whpk_path(path)
    assert (pub_path, whpk_path) == (tmp_path / "webhook.pub.pem", tmp_path / "webhook.pub.whpk")
    assert pub_path.read_bytes() == first.public_pem()
    raw = first.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert whpk_path.read_text() == "whpk_" + base64.b64encode(raw).decode() + "\n"  # the spec's format
    assert whpk_path.stat().st_mode & 0o777 == 0o600
    pub_path.unlink()
    whpk_path.unlink()
    again = WebhookSigner.load_or_create(path)
    assert again.public_whpk() == first.public_whpk()
    assert pub_path.read_bytes() == first.public_pem()  # rewritten when missing
    headers = again.sign("r", int(time.time()), b"x")
    for key in (load_public_key(pub_path.read_bytes()), whpk_path.read_text()):
        assert verify_webhook(headers, b"x", [key], now=time.time()) == "r"


def test_whpk_keys_round_trip_and_bad_ones_are_refused(signer: WebhookSigner) -> None:
    text = encode_public_key(signer.public_key)
    assert text.startswith("whpk_") and len(text) == 5 + 44
    assert encode_public_key(parse_public_key(text)) == text
    assert encode_public_key(parse_public_key(text.rstrip("="))) == text  # padding optional
    for bad in ["", text[5:], "whpk_!!!!", "whpk_" + base64.b64encode(b"x" * 31).decode(), "whsec_" + text[5:]]:
        with pytest.raises(ValueError):
            parse_public_key(bad)
    with pytest.raises(ValueError):
        verify_webhook(signer.sign("r", int(time.time()), b""), b"", ["whpk_junk"], now=time.time())


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
