"""Webhook delivery for completed async jobs (fal's `fal_webhook`), signed with Ed25519.

When an async job submitted with `?fal_webhook=URL` completes, the queue node POSTs a JSON body in
fal's webhook shape (`webhook_body`) to URL through a `WebhookSender`, which retries with backoff and
reports every attempt (`on_result`) so that the node can persist progress and resume after a restart.

Signature scheme (docs/webhooks.md has the receiver's side):

    message   = request_id + "\\n" + str(timestamp) + "\\n" + sha256(body).hexdigest()    (UTF-8)
    signature = Ed25519(private_key, message), sent as 128 lowercase hex digits

Headers on every attempt (each attempt is signed afresh, with its own timestamp):

    X-Casola-Webhook-Request-Id   the job's request id (also `request_id` in the body)
    X-Casola-Webhook-Timestamp    unix seconds when this attempt was signed
    X-Casola-Webhook-Key-Id       first 16 hex digits of sha256(raw 32-byte public key)
    X-Casola-Webhook-Signature    the signature above

A receiver checks the timestamp is within a tolerance of its clock (default 300 s), finds the public
key by key id, and verifies the signature over the message it rebuilds from the raw body
(`verify_webhook`). This is fal's scheme (Ed25519, hex signature, sha256 of the body, newline-joined
fields, ±5 min) without fal's user id field and with a key id header instead of trying every key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import msgspec
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from casola import __version__
from casola.files import write_atomic
from casola.net.pool import Backoff

__all__ = [
    "H_KEY_ID",
    "H_REQUEST_ID",
    "H_SIGNATURE",
    "H_TIMESTAMP",
    "WebhookSender",
    "WebhookSigner",
    "WebhookVerifyError",
    "load_public_key",
    "public_key_id",
    "public_key_path",
    "verify_webhook",
    "webhook_body",
]

log = logging.getLogger("casola.webhooks")

H_REQUEST_ID: Final = "X-Casola-Webhook-Request-Id"
H_TIMESTAMP: Final = "X-Casola-Webhook-Timestamp"
H_KEY_ID: Final = "X-Casola-Webhook-Key-Id"
H_SIGNATURE: Final = "X-Casola-Webhook-Signature"

_RETRY_STATUS: Final = frozenset({408, 425, 429})  # plus every 5xx
_DRAIN_MAX: Final = 64 * 1024  # response bytes read (and dropped) so a small reply keeps its connection


def _message(request_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{request_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()


def public_key_id(key: Ed25519PublicKey) -> str:
    """The key id sent in `X-Casola-Webhook-Key-Id`: 16 hex digits of sha256 of the raw public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_path(private_path: Path) -> Path:
    """Where `WebhookSigner.load_or_create` writes the public PEM: `<stem>.pub.pem` beside the key."""
    return private_path.with_name(f"{private_path.stem}.pub.pem")


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Raises ValueError unless `pem` is an Ed25519 public key in PEM (SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 public key: {type(key).__name__}")
    return key


class WebhookSigner:
    """Signs webhook deliveries with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.key_id: str = public_key_id(self.public_key)

    @classmethod
    def load_or_create(cls, path: Path) -> WebhookSigner:
        """Load the PEM (PKCS#8) private key at `path`, or create one there (mode 0600).

        Also writes the public key to `public_key_path(path)` (mode 0644) when missing or different.

        Raises:
            ValueError: the file is not an unencrypted Ed25519 private key in PEM.
            OSError: the files cannot be read or written.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            data = pem if write_atomic(path, pem, 0o600, exclusive=True) else path.read_bytes()  # lost a race
        else:
            if path.stat().st_mode & 0o077:
                log.warning("%s: webhook signing key is readable by group or others", path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
        signer = cls(key)
        pub_path, pub = public_key_path(path), signer.public_pem()
        try:
            current: bytes | None = pub_path.read_bytes()
        except FileNotFoundError:
            current = None
        if current != pub:
            write_atomic(pub_path, pub, 0o644)
        return signer

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, request_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The four signature headers for one delivery attempt of `body`."""
        if not request_id or "\n" in request_id or "\r" in request_id:
            raise ValueError(f"bad request id for a webhook: {request_id!r}")
        sig = self._key.sign(_message(request_id, timestamp, body)).hex()
        return {H_REQUEST_ID: request_id, H_TIMESTAMP: str(timestamp), H_KEY_ID: self.key_id, H_SIGNATURE: sig}


class WebhookVerifyError(ValueError):
    """A webhook failed verification; the message says why."""


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    public_keys: Mapping[str, Ed25519PublicKey] | Sequence[Ed25519PublicKey],
    now: float,
    tolerance_s: float = 300,
) -> str:
    """Verify one received webhook; return its request id.

    Args:
        headers: the request's headers (names compared case-insensitively).
        body: the raw request body, exactly as received.
        public_keys: trusted keys, by key id (`public_key_id`) or as a sequence.
        now: the receiver's unix time.
        tolerance_s: how far the signed timestamp may be from `now`, either way.

    Raises:
        WebhookVerifyError: a header is missing or malformed, the timestamp is out of tolerance,
            the key id is unknown, or the signature does not match.
    """
    lower = {k.lower(): v for k, v in headers.items()}

    def get(name: str) -> str:
        value = lower.get(name.lower(), "").strip()
        if not value:
            raise WebhookVerifyError(f"missing header {name}")
        return value

    request_id, ts_text, key_id, sig_hex = get(H_REQUEST_ID), get(H_TIMESTAMP), get(H_KEY_ID), get(H_SIGNATURE)
    if not (ts_text.isascii() and ts_text.isdigit()):
        raise WebhookVerifyError(f"bad {H_TIMESTAMP}: {ts_text[:32]!r} is not unix seconds")
    timestamp = int(ts_text)
    if timestamp < now - tolerance_s:
        raise WebhookVerifyError(f"timestamp too old: {now - timestamp:.0f} s ago (tolerance {tolerance_s:g} s)")
    if timestamp > now + tolerance_s:
        raise WebhookVerifyError(
            f"timestamp in the future: {timestamp - now:.0f} s ahead (tolerance {tolerance_s:g} s)"
        )
    keys = public_keys if isinstance(public_keys, Mapping) else {public_key_id(k): k for k in public_keys}
    key = keys.get(key_id)
    if key is None:
        raise WebhookVerifyError(f"unknown key id {key_id[:32]!r}")
    try:
        signature = bytes.fromhex(sig_hex)
    except ValueError:
        raise WebhookVerifyError(f"bad {H_SIGNATURE}: not hex") from None
    try:
        key.verify(signature, _message(request_id, timestamp, body))
    except InvalidSignature:
        raise WebhookVerifyError("bad signature: body, request id or timestamp altered, or wrong key") from None
    return request_id


_raw_decoder: Final = msgspec.json.Decoder(msgspec.Raw)
_encoder: Final = msgspec.json.Encoder()


def _as_json(result: bytes) -> msgspec.Raw | None:
    """`result` as one JSON value, unchanged, or None when it is not valid JSON in UTF-8."""
    try:
        raw = _raw_decoder.decode(result)
    except msgspec.DecodeError:
        return None
    if not result.isascii():  # the Raw decoder checks syntax, not the UTF-8 of strings
        try:
            result.decode()
        except UnicodeDecodeError:
            return None
    return raw


def webhook_body(
    request_id: str,
    ok: bool,
    result: bytes | bytearray | memoryview | None,
    result_content_type: str,
    error: str = "",
    error_type: str = "",
) -> bytes:
    """The JSON body POSTed for a completed job, in fal's webhook shape.

    `{"request_id", "gateway_request_id", "status": "OK" | "ERROR", "payload", "error"}`, plus
    `error_type` when not ok. A result that is JSON is embedded as `payload` unchanged (whatever its
    content type); otherwise `payload` is null and `payload_error` and `result_content_type` say why
    (the result is still available from the job's result URL). No result (None or empty) is a null
    payload without `payload_error`.
    """
    doc: dict[str, object] = {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK" if ok else "ERROR",
        "payload": None,
        "error": None if ok else (error or "job failed"),
    }
    if not ok:
        doc["error_type"] = error_type or "UNKNOWN"
    if result:
        payload = _as_json(result if isinstance(result, bytes) else bytes(result))
        if payload is not None:
            doc["payload"] = payload
        else:
            ct = result_content_type or "application/octet-stream"
            doc["payload_error"] = f"result is not JSON ({ct}, {len(result)} bytes); fetch it from the response URL"
            doc["result_content_type"] = ct
    return _encoder.encode(doc)


OnResult = Callable[[str, bool, int, float | None], Awaitable[None] | None]


@dataclass(eq=False)
class _Delivery:
    url: str
    request_id: str
    body: bytes
    attempts: int
    backoff: Backoff


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"bad webhook URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"webhook URL must be http(s)://host/...: {url[:200]!r}")


def _where(url: str) -> str:
    """The URL without user info, path or query, for logs (those may hold secrets)."""
    u = httpx.URL(url)
    return f"{u.scheme}://{u.host}" + (f":{u.port}" if u.port else "")


def _retry_after(value: str | None) -> float | None:
    """Retry-After in delta-seconds, or None (absent, or an HTTP-date: backoff is used instead)."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class WebhookSender:
    """Delivers signed webhook POSTs with retries, at most `max_pending` at a time.

    2xx is delivered; 408, 425, 429, 5xx, network errors and timeouts are retried after exponential
    backoff with full jitter (or the response's Retry-After seconds), both capped at `max_delay`, until
    `max_attempts` attempts; any other status is a permanent failure (redirects are not followed).
    After every attempt `on_result(request_id, delivered, attempts, next_at)` is called (and awaited if
    it returns an awaitable): `next_at` is the unix time of the next attempt, None when finished.
    """

    def __init__(
        self,
        signer: WebhookSigner,
        *,
        max_pending: int = 10000,
        max_attempts: int = 8,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        timeout: float = 10.0,
        concurrency: int = 16,
        on_result: OnResult | None = None,
    ) -> None:
        if max_pending < 1 or max_attempts < 1 or concurrency < 1:
            raise ValueError("max_pending, max_attempts and concurrency must be at least 1")
        self._signer = signer
        self.max_pending, self.max_attempts = max_pending, max_attempts
        self.base_delay, self.max_delay, self.timeout = base_delay, max_delay, timeout
        self._concurrency = concurrency
        self._on_result = on_result
        self._pending: dict[str, _Delivery] = {}
        self._heap: list[tuple[float, int, str]] = []  # (monotonic due time, seq, request id)
        self._seq = 0
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Deliveries submitted and not yet finished (waiting, in flight or backing off)."""
        return len(self._pending)

    def is_pending(self, request_id: str) -> bool:
        return request_id in self._pending

    def start(self) -> None:
        """Start delivering (call from within the event loop). Submissions made before are kept."""
        if self._tasks or self._closed:
            return
        self._client = httpx.AsyncClient(
            timeout=self.timeout,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=self._concurrency),
            headers={"user-agent": f"casola-webhooks/{__version__}"},
        )
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._dispatch(), name="webhooks dispatch"))
        self._tasks += [loop.create_task(self._work(), name=f"webhooks {i}") for i in range(self._concurrency)]

    async def stop(self) -> None:
        """Stop at once: attempts in flight are abandoned, pending deliveries dropped (without
        `on_result`; the caller's store still holds their last `next_at`)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._pending.clear()
        self._heap.clear()

    def submit(
        self, url: str, request_id: str, body: bytes, attempts_so_far: int = 0, *, not_before: float | None = None
    ) -> bool:
        """Queue `body` for delivery to `url`.

        `attempts_so_far` and `not_before` (unix time of the first attempt; None: now) resume a
        delivery persisted before a restart; at least one attempt is made whatever `attempts_so_far`.

        Returns:
            False when the sender is full or stopped; True when queued or already pending (a
            request id is never queued twice; the first body wins).

        Raises:
            ValueError: `url` is not an http or https URL.
        """
        _check_url(url)
        if request_id in self._pending:
            return True
        if self._closed or len(self._pending) >= self.max_pending:
            return False
        backoff = Backoff(self.base_delay, self.max_delay)
        backoff.attempt = min(max(attempts_so_far, 0), 30)
        self._pending[request_id] = _Delivery(url, request_id, body, max(attempts_so_far, 0), backoff)
        delay = 0.0 if not_before is None else max(0.0, not_before - time.time())
        self._schedule(request_id, delay)
        return True

    def _schedule(self, request_id: str, delay: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time.monotonic() + delay, self._seq, request_id))
        self._wake.set()

    async def _dispatch(self) -> None:
        while True:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                self._ready.put_nowait(heapq.heappop(self._heap)[2])
            self._wake.clear()
            wait = self._heap[0][0] - now if self._heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _work(self) -> None:
        while True:
            delivery = self._pending.get(await self._ready.get())
            if delivery is None:
                continue
            try:
                await self._attempt(delivery)
            except Exception:  # a bug here must not end the worker or leave the delivery stuck
                log.exception("webhook %s: delivery failed unexpectedly; giving up", delivery.request_id)
                self._pending.pop(delivery.request_id, None)

    async def _attempt(self, d: _Delivery) -> None:
        assert self._client is not None
        d.attempts += 1
        headers = {"content-type": "application/json", **self._signer.sign(d.request_id, int(time.time()), d.body)}
        status: int | None = None
        retry_after: str | None = None
        problem = ""
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client.stream("POST", d.url, content=d.body, headers=headers) as resp:
                    status, retry_after = resp.status_code, resp.headers.get("retry-after")
                    seen = 0
                    async for chunk in resp.aiter_raw():
                        seen += len(chunk)
                        if seen > _DRAIN_MAX:
                            break
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            if status is None:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        delivered = status is not None and 200 <= status < 300
        retryable = status is None or status in _RETRY_STATUS or status >= 500
        next_at: float | None = None
        if delivered:
            log.debug("webhook %s: delivered to %s (attempt %d)", d.request_id, _where(d.url), d.attempts)
        else:
            if retryable and d.attempts < self.max_attempts:
                delay = _retry_after(retry_after) if status is not None else None
                delay = min(self.max_delay, delay if delay is not None else d.backoff.next())
                next_at, then = time.time() + delay, f"retrying in {delay:.3f} s"
            else:
                then = "giving up: " + ("no attempts left" if retryable else "not retryable")
            what = f"{problem or f'HTTP {status}'} from {_where(d.url)}"
            log.warning("webhook %s: %s (attempt %d/%d); %s", d.request_id, what, d.attempts, self.max_attempts, then)
        if next_at is None:
            self._pending.pop(d.request_id, None)
        if self._on_result is not None:
            try:
                outcome = self._on_result(d.request_id, delivered, d.attempts, next_at)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("webhook %s: on_result failed", d.request_id)
        if next_at is not None:
            self._schedule(d.request_id, max(0.0, next_at - time.time()))
