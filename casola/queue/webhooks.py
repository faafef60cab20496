"""Webhook delivery for completed async jobs (fal's `fal_webhook`), signed the Standard Webhooks way.

When an async job submitted with a webhook URL completes, the queue node POSTs a JSON body in fal's
webhook shape (`webhook_body`) to the URL through a `WebhookSender`, which retries with backoff,
shares its workers fairly between tenants, and reports every attempt (`on_result`) so that the node
can persist progress and resume after a restart. Every connection goes through
`casola.net.outbound` (the outbound address policy: no loopback, private or link-local receivers
unless the operator allows them).

Signature (https://www.standardwebhooks.com/, asymmetric form; docs/webhooks.md has the receiver's
side). Each attempt is signed afresh, with its own timestamp:

    webhook-id         the job's request id (the same on every attempt: the receiver's idempotency key)
    webhook-timestamp  unix seconds when this attempt was signed
    webhook-signature  "v1a," + base64(Ed25519(private_key, f"{id}.{timestamp}.".encode() + body))

The header may carry several space-separated signatures (key rotation); a receiver accepts the
webhook when one `v1a` signature verifies with a key it trusts and the timestamp is within its
tolerance (default 300 s) of its clock (`verify_webhook`). Public keys are given as `whpk_` + base64
of the raw 32-byte key, beside the PEM the node writes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import heapq
import inspect
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from casola import __version__
from casola.files import write_atomic
from casola.net.outbound import (
    OutboundCallError,
    OutboundClient,
    OutboundPolicy,
    OutboundRefused,
    OutboundURL,
    Resolver,
    system_resolver,
)
from casola.net.pool import Backoff

__all__ = [
    "H_ID",
    "H_SIGNATURE",
    "H_TIMESTAMP",
    "WebhookSender",
    "WebhookSigner",
    "WebhookVerifyError",
    "encode_public_key",
    "load_public_key",
    "parse_public_key",
    "public_key_path",
    "public_whpk_path",
    "verify_webhook",
    "webhook_body",
]

log = logging.getLogger("casola.webhooks")

H_ID: Final = "webhook-id"
H_TIMESTAMP: Final = "webhook-timestamp"
H_SIGNATURE: Final = "webhook-signature"
SIGNATURE_VERSION: Final = "v1a"  # Standard Webhooks: asymmetric (Ed25519); "v1" is HMAC-SHA256
PUBLIC_KEY_PREFIX: Final = "whpk_"

# Visible ASCII but ".", the separator of the signed content (the spec warns ids must not hold it).
_MSG_ID: Final = re.compile(r"[\x21-\x2d\x2f-\x7e]{1,256}")
_MAX_SIGNATURES: Final = 16  # entries of webhook-signature looked at: rotation needs two or three
_RETRY_STATUS: Final = frozenset({408, 425, 429})  # plus every 5xx
_DRAIN_MAX: Final = 64 * 1024  # response bytes read (and dropped) so a small reply keeps its connection


def _signed_content(msg_id: str, timestamp: str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body  # the spec's "{msg_id}.{timestamp}.{payload}"


def encode_public_key(key: Ed25519PublicKey) -> str:
    """The key in Standard Webhooks' format: `whpk_` + base64 of the raw 32-byte public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Raises ValueError unless `text` is `whpk_` + base64 of a raw 32-byte Ed25519 public key."""
    text = text.strip()
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError(f"not a {PUBLIC_KEY_PREFIX} public key: no {PUBLIC_KEY_PREFIX} prefix")
    b64 = text.removeprefix(PUBLIC_KEY_PREFIX)
    try:
        raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)  # padding is optional
    except binascii.Error as exc:
        raise ValueError(f"not a {PUBLIC_KEY_PREFIX} public key: {exc}") from None
    if len(raw) != 32:
        raise ValueError(f"not a {PUBLIC_KEY_PREFIX} public key: {len(raw)} bytes, not 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_path(private_path: Path) -> Path:
    """Where `WebhookSigner.load_or_create` writes the public PEM: `<stem>.pub.pem` beside the key."""
    return private_path.with_name(f"{private_path.stem}.pub.pem")


def public_whpk_path(private_path: Path) -> Path:
    """Where `WebhookSigner.load_or_create` writes the `whpk_` public key: `<stem>.pub.whpk`."""
    return private_path.with_name(f"{private_path.stem}.pub.whpk")


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Raises ValueError unless `pem` is an Ed25519 public key in PEM (SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 public key: {type(key).__name__}")
    return key


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write `data` to `path`, mode 0600, unless it already holds it with that mode or a narrower one
    (a file an older version wrote 0644 is tightened: every state file is private, and an operator
    copies a public key out of the state directory to share it)."""
    try:
        current: bytes | None = path.read_bytes()
        loose = path.stat().st_mode & 0o077
    except FileNotFoundError:
        current, loose = None, 0
    if current != data or loose:
        write_atomic(path, data, 0o600)


class WebhookSigner:
    """Signs webhook deliveries with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()

    @classmethod
    def load_or_create(cls, path: Path) -> WebhookSigner:
        """Load the PEM (PKCS#8) private key at `path`, or create one there (mode 0600).

        Also writes the public key, mode 0600, when missing, different or wider: as PEM to
        `public_key_path(path)` and as `whpk_...` to `public_whpk_path(path)`.

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
        _write_if_changed(public_key_path(path), signer.public_pem())
        _write_if_changed(public_whpk_path(path), (signer.public_whpk() + "\n").encode())
        return signer

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def public_whpk(self) -> str:
        """The public key as Standard Webhooks gives it to receivers: `whpk_` + base64(raw key)."""
        return encode_public_key(self.public_key)

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers for one delivery attempt of `body`.

        Raises:
            ValueError: `msg_id` is empty, longer than 256, or holds anything but visible ASCII
                other than "." (the separator of the signed content).
        """
        if not _MSG_ID.fullmatch(msg_id):
            raise ValueError(f"bad webhook id: {msg_id[:64]!r}")
        ts = str(int(timestamp))
        signature = base64.b64encode(self._key.sign(_signed_content(msg_id, ts, body))).decode("ascii")
        return {H_ID: msg_id, H_TIMESTAMP: ts, H_SIGNATURE: f"{SIGNATURE_VERSION},{signature}"}


class WebhookVerifyError(ValueError):
    """A webhook failed verification; the message says why."""


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    public_keys: Iterable[Ed25519PublicKey | str],
    now: float,
    tolerance_s: float = 300,
) -> str:
    """Verify one received webhook (Standard Webhooks, `v1a`); return its `webhook-id`.

    Args:
        headers: the request's headers (names compared case-insensitively).
        body: the raw request body, exactly as received.
        public_keys: trusted keys, as key objects or `whpk_...` strings; any one may have signed.
        now: the receiver's unix time.
        tolerance_s: how far the signed timestamp may be from `now`, either way.

    Raises:
        WebhookVerifyError: a header is missing or malformed, the timestamp is out of tolerance,
            or no `v1a` signature in the header verifies with a trusted key.
        ValueError: a `public_keys` string is not a `whpk_` key.
    """
    keys = [k if isinstance(k, Ed25519PublicKey) else parse_public_key(k) for k in public_keys]
    lower = {k.lower(): v for k, v in headers.items()}

    def get(name: str) -> str:
        if not (value := lower.get(name, "").strip()):
            raise WebhookVerifyError(f"missing header {name}")
        return value

    msg_id, ts, signatures = get(H_ID), get(H_TIMESTAMP), get(H_SIGNATURE)
    if not _MSG_ID.fullmatch(msg_id):
        raise WebhookVerifyError(f"bad {H_ID}: {msg_id[:64]!r}")
    _check_timestamp(ts, now, tolerance_s)
    content = _signed_content(msg_id, ts, body)
    candidates = [sig for sig in map(_v1a, signatures.split(" ")[:_MAX_SIGNATURES]) if sig is not None]
    if not candidates:
        raise WebhookVerifyError(f"no {SIGNATURE_VERSION} signature in {H_SIGNATURE}")
    for signature in candidates:
        for key in keys:
            try:
                key.verify(signature, content)  # OpenSSL's Ed25519: no secret compared, nothing to time
            except InvalidSignature:
                continue
            return msg_id
    raise WebhookVerifyError("bad signature: body, id or timestamp altered, or not signed by a trusted key")


def _check_timestamp(ts: str, now: float, tolerance_s: float) -> None:
    if not (ts.isascii() and ts.isdigit() and len(ts) <= 16):
        raise WebhookVerifyError(f"bad {H_TIMESTAMP}: {ts[:32]!r} is not unix seconds")
    timestamp = int(ts)
    if timestamp < now - tolerance_s:
        raise WebhookVerifyError(f"timestamp too old: {now - timestamp:.0f} s ago (tolerance {tolerance_s:g} s)")
    if timestamp > now + tolerance_s:
        raise WebhookVerifyError(
            f"timestamp in the future: {timestamp - now:.0f} s ahead (tolerance {tolerance_s:g} s)"
        )


def _v1a(entry: str) -> bytes | None:
    """The raw signature of one `v1a,<base64>` entry; None for other versions and malformed ones."""
    version, _, value = entry.partition(",")
    if version != SIGNATURE_VERSION:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        return None
    return raw if len(raw) == 64 else None


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
    target: OutboundURL
    request_id: str
    tenant: str
    body: bytes
    attempts: int
    backoff: Backoff


def _retry_after(value: str | None) -> float | None:
    """Retry-After in delta-seconds, or None (absent, or an HTTP-date: backoff is used instead)."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class WebhookSender:
    """Delivers signed webhook POSTs with retries, fairly between tenants.

    2xx is delivered; 408, 425, 429, 5xx, network errors and timeouts are retried after exponential
    backoff with full jitter (or the response's Retry-After seconds), both capped at `max_delay`, until
    `max_attempts` attempts; any other status, and a receiver whose addresses `policy` refuses, is a
    permanent failure (redirects are not followed). After every attempt `on_result(request_id,
    delivered, attempts, next_at)` is called (and awaited if it returns an awaitable): `next_at` is the
    unix time of the next attempt, None when finished.

    Fairness: at most `concurrency` attempts are in flight, at most `per_tenant` of them one tenant's,
    and ready deliveries are started round-robin across tenants; so one tenant's receivers that accept
    and never answer hold `per_tenant` workers (for `timeout` each), never all of them. At most
    `max_pending` deliveries wait, `max_pending_per_tenant` of them one tenant's.
    """

    def __init__(
        self,
        signer: WebhookSigner,
        *,
        policy: OutboundPolicy | None = None,
        max_pending: int = 10000,
        max_pending_per_tenant: int = 1000,
        max_attempts: int = 8,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        timeout: float = 10.0,
        concurrency: int = 16,
        per_tenant: int = 4,
        on_result: OnResult | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        """`policy` None refuses every non-public address; `resolver` is for tests (fake names).

        Raises:
            ValueError: a count below 1.
        """
        if min(max_pending, max_pending_per_tenant, max_attempts, concurrency, per_tenant) < 1:
            raise ValueError("max_pending(_per_tenant), max_attempts, concurrency and per_tenant must be at least 1")
        self._signer = signer
        self.policy = policy if policy is not None else OutboundPolicy()
        self.max_pending, self.max_pending_per_tenant = max_pending, max_pending_per_tenant
        self.max_attempts, self.base_delay, self.max_delay, self.timeout = max_attempts, base_delay, max_delay, timeout
        self.concurrency, self.per_tenant = concurrency, per_tenant
        self._on_result, self._resolver = on_result, resolver
        self._pending: dict[str, _Delivery] = {}
        self._tenant_pending: dict[str, int] = {}
        self._heap: list[tuple[float, int, str]] = []  # (monotonic due time, seq, request id)
        self._seq = 0
        self._ready: dict[str, deque[str]] = {}  # tenant -> due request ids; dict order is the round
        self._busy: dict[str, int] = {}  # tenant -> attempts in flight
        self._inflight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._client: OutboundClient | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Deliveries submitted and not yet finished (waiting, in flight or backing off)."""
        return len(self._pending)

    def is_pending(self, request_id: str) -> bool:
        return request_id in self._pending

    def start(self) -> None:
        """Start delivering (call from within the event loop). Submissions made before are kept."""
        if self._dispatcher is not None or self._closed:
            return
        self._client = OutboundClient(
            self.policy,
            timeout=self.timeout,
            max_connections=self.concurrency,
            user_agent=f"casola-webhooks/{__version__}",
            resolver=self._resolver,
        )
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="webhooks dispatch")

    async def stop(self) -> None:
        """Stop at once: attempts in flight are abandoned, pending deliveries dropped (without
        `on_result`; the caller's store still holds their last `next_at`)."""
        self._closed = True
        tasks = [*self._inflight, *([self._dispatcher] if self._dispatcher is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._pending.clear()
        self._tenant_pending.clear()
        self._heap.clear()
        self._ready.clear()

    def submit(
        self,
        url: str,
        request_id: str,
        body: bytes,
        attempts_so_far: int = 0,
        *,
        tenant: str,
        not_before: float | None = None,
    ) -> bool:
        """Queue `body` for delivery to `url` on behalf of `tenant`.

        `attempts_so_far` and `not_before` (unix time of the first attempt; None: now) resume a
        delivery persisted before a restart; at least one attempt is made whatever `attempts_so_far`.
        A host that is a name is checked when connecting (a refusal then is a permanent failure).

        Returns:
            False when the sender, or the tenant's share of it, is full, or it is stopped; True when
            queued or already pending (a request id is never queued twice; the first body wins).

        Raises:
            ValueError: `url` is not an http(s) URL, or its host is an address the policy refuses
                (`OutboundRefused`); the message names the host only.
        """
        target = self.policy.check_url(url)
        if request_id in self._pending:
            return True
        if self._closed or len(self._pending) >= self.max_pending:
            return False
        if self._tenant_pending.get(tenant, 0) >= self.max_pending_per_tenant:
            return False
        backoff = Backoff(self.base_delay, self.max_delay)
        backoff.attempt = min(max(attempts_so_far, 0), 30)
        self._pending[request_id] = _Delivery(target, request_id, tenant, body, max(attempts_so_far, 0), backoff)
        self._tenant_pending[tenant] = self._tenant_pending.get(tenant, 0) + 1
        delay = 0.0 if not_before is None else max(0.0, not_before - time.time())
        self._schedule(request_id, delay)
        return True

    def _finish(self, d: _Delivery) -> None:
        if self._pending.pop(d.request_id, None) is not None:
            left = self._tenant_pending.pop(d.tenant, 1) - 1
            if left > 0:
                self._tenant_pending[d.tenant] = left

    def _schedule(self, request_id: str, delay: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time.monotonic() + delay, self._seq, request_id))
        self._wake.set()

    # -- dispatch: due -> ready (per tenant) -> in flight (round-robin, bounded) --------------------

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                d = self._pending.get(heapq.heappop(self._heap)[2])
                if d is not None:
                    self._ready.setdefault(d.tenant, deque()).append(d.request_id)
            self._start_ready()
            wait = self._heap[0][0] - now if self._heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _start_ready(self) -> None:
        while len(self._inflight) < self.concurrency:
            tenant = next((t for t in self._ready if self._busy.get(t, 0) < self.per_tenant), None)
            if tenant is None:
                return
            queue = self._ready.pop(tenant)
            d = self._pending.get(queue.popleft())
            if queue:
                self._ready[tenant] = queue  # back of the round
            if d is not None:
                self._launch(d)

    def _launch(self, d: _Delivery) -> None:
        self._busy[d.tenant] = self._busy.get(d.tenant, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run(d), name=f"webhook {d.request_id}")
        self._inflight.add(task)
        # A done callback runs even for a task cancelled before it started (a `finally` would not).
        task.add_done_callback(lambda t: self._landed(t, d.tenant))

    def _landed(self, task: asyncio.Task[None], tenant: str) -> None:
        self._inflight.discard(task)
        left = self._busy.pop(tenant, 1) - 1
        if left > 0:
            self._busy[tenant] = left
        self._wake.set()

    async def _run(self, d: _Delivery) -> None:
        try:
            await self._attempt(d)
        except Exception:  # a bug here must not leave the delivery stuck
            log.exception("webhook %s: delivery failed unexpectedly; giving up", d.request_id)
            self._finish(d)

    # -- one attempt ---------------------------------------------------------------------------------

    async def _attempt(self, d: _Delivery) -> None:
        d.attempts += 1
        status, retry_after, problem, permanent = await self._post(d)
        delivered = status is not None and 200 <= status < 300
        retryable = not permanent and (status is None or status in _RETRY_STATUS or status >= 500)
        next_at: float | None = None
        if delivered:
            log.debug("webhook %s: delivered to %s (attempt %d)", d.request_id, d.target.where, d.attempts)
        else:
            if retryable and d.attempts < self.max_attempts:
                delay = _retry_after(retry_after) if status is not None else None
                delay = min(self.max_delay, delay if delay is not None else d.backoff.next())
                next_at, then = time.time() + delay, f"retrying in {delay:.3f} s"
            else:
                then = "giving up: " + ("no attempts left" if retryable else "not retryable")
            what = problem or f"HTTP {status} from {d.target.where}"
            log.warning("webhook %s: %s (attempt %d/%d); %s", d.request_id, what, d.attempts, self.max_attempts, then)
        if next_at is None:
            self._finish(d)
        await self._report(d, delivered, next_at)
        if next_at is not None:
            self._schedule(d.request_id, max(0.0, next_at - time.time()))

    async def _post(self, d: _Delivery) -> tuple[int | None, str | None, str, bool]:
        """(status, Retry-After, problem, permanent) of one POST; problem names the host only."""
        assert self._client is not None
        headers = {"content-type": "application/json", **self._signer.sign(d.request_id, int(time.time()), d.body)}
        try:
            resp = await self._client.post(d.target, d.body, headers, max_response=_DRAIN_MAX)
        except OutboundRefused as exc:
            return None, None, str(exc), True
        except OutboundCallError as exc:
            return None, None, str(exc), False
        return resp.status, resp.headers.get("retry-after"), "", False

    async def _report(self, d: _Delivery, delivered: bool, next_at: float | None) -> None:
        if self._on_result is None:
            return
        try:
            outcome = self._on_result(d.request_id, delivered, d.attempts, next_at)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            log.exception("webhook %s: on_result failed", d.request_id)
