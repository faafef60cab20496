"""API-key tokens: the claims they carry, signing them with Ed25519, and verifying them per request.

Wire format::

    csk_<b64(payload)>.<b64(signature)>

    payload   = msgpack(Claims), an array: [kid, tenant, scopes, region, exp, iat, filter, max_priority,
                max_inflight]
    signature = Ed25519(private_key, b"casola-key-v1\\x00" + payload)   (64 bytes)
    b64       = base64url, no "=" padding (RFC 4648 section 5)

Claims only ever grow at the end, with a default: a token from before a field existed (6 elements,
no `filter`) still verifies and gets the default, and an older verifier ignores elements it does not
know. The domain-separation prefix keeps a signature over a token from being valid for any other message
signed with the same key. The token itself is the secret: anyone holding it acts as its kid.

`Verifier.verify` is on the hot path of every HTTP request. A full check (base64, msgpack, Ed25519) costs
tens of microseconds, so tokens whose signature verified are kept in a bounded cache; a repeat costs a
dict lookup plus the expiry, revocation and scope checks, which are made on every call, cached or not.
Tokens that fail are never cached, so garbage cannot push good tokens out.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from casola.auth.revocation import RevocationList
from casola.wire.errors import CasolaError

__all__ = [
    "ALL_SCOPES",
    "DEFAULT_CACHE_SIZE",
    "FILTER_POLICIES",
    "MAX_TOKEN_LENGTH",
    "SCOPE_INGRESS",
    "SCOPE_METRICS",
    "SCOPE_RUN",
    "SCOPE_SIGNALS",
    "SCOPE_WORKER",
    "TOKEN_PREFIX",
    "AuthError",
    "Claims",
    "Verifier",
    "b64url_decode",
    "b64url_encode",
    "sign_token",
]

SCOPE_RUN: Final = "run"  # may submit requests (user API keys)
SCOPE_WORKER: Final = "worker"  # may register as a worker with a queue node
SCOPE_INGRESS: Final = "ingress"  # node credential: an ingress dialling a queue node
SCOPE_SIGNALS: Final = "signals"  # may read the scheduling signals (an autoscaler): GET /v1/signals
# may read GET /metrics where the deployment asks for a key there (`metrics_key = true`)
SCOPE_METRICS: Final = "metrics"
ALL_SCOPES: Final = (SCOPE_RUN, SCOPE_WORKER, SCOPE_INGRESS, SCOPE_SIGNALS, SCOPE_METRICS)
# A key's content-filter policy; "" = none of its own (the queue node's per-model policy applies).
FILTER_POLICIES: Final = ("", "off", "race", "block", "hold")

TOKEN_PREFIX: Final = "csk_"
_DOMAIN: Final = b"casola-key-v1\x00"
_SIGNATURE_SIZE: Final = 64  # RFC 8032 section 5.1.6

# Longer input is refused before any decoding. A token with a few scopes is ~150 characters; 4 KiB is
# half of the common 8 KiB header-line limit (nginx `large_client_header_buffers`, Apache
# `LimitRequestFieldSize`), so no real token comes near it and garbage costs nothing to reject.
MAX_TOKEN_LENGTH: Final = 4096

# Distinct valid tokens kept verified. At ~150 characters plus a Claims, 10k entries is a few MiB and
# covers the active keys of a large deployment; past it the oldest entry is evicted (FIFO).
DEFAULT_CACHE_SIZE: Final = 10_000


class Claims(msgspec.Struct, frozen=True, array_like=True):
    """What a token carries; signed, so every field is trusted once the signature verifies."""

    kid: str  # key id, e.g. "k_" + 12 hex chars; what revocation names
    tenant: str
    scopes: tuple[str, ...]
    region: str = ""  # region pin ("" = none)
    exp: int = 0  # expiry, unix seconds; 0 = never
    iat: int = 0  # issued at, unix seconds
    # Content-filter policy, one of FILTER_POLICIES ("" = none). A plain str, not a Literal: a value
    # from a newer issuer must not make the whole token unreadable; the ingress maps unknown ones to "".
    filter: str = ""
    # The highest priority the key's requests may ask for (RequestMeta.priority, SPEC §4.3); anything
    # lower is always allowed. A caller cannot raise its own: the key says how far it may go.
    max_priority: int = 0
    # Requests the key may have in progress at once, at the ingress; 0: the tenant's limit applies.
    max_inflight: int = 0


class AuthError(CasolaError):
    """A request's credential was refused.

    `.status` is the HTTP status to answer with: 401 (missing, malformed, bad signature, expired,
    revoked) or 403 (a valid key without the needed scope). `.code` is a short machine code, and
    `.message` human text that never contains the token.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Claims)


def sign_token(private_key: Ed25519PrivateKey, claims: Claims) -> str:
    """Encode and sign `claims` as a token (see the module docstring for the format).

    Raises:
        TypeError: `claims` holds values msgpack cannot encode.
    """
    payload = _encoder.encode(claims)
    signature = private_key.sign(_DOMAIN + payload)
    return TOKEN_PREFIX + b64url_encode(payload) + "." + b64url_encode(signature)


class Verifier:
    """Checks tokens against a set of public keys, a revocation list, a clock and a scope."""

    __slots__ = ("_cache", "_cache_size", "_public_keys", "_revoked")

    def __init__(
        self,
        public_keys: Sequence[Ed25519PublicKey],
        revoked: RevocationList | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """Trust tokens signed by any of `public_keys`, except kids in `revoked`.

        Args:
            public_keys: keys tried in order; more than one allows signing-key rotation.
            revoked: polled with `maybe_reload(now)` on every `verify`; None revokes nothing.
            cache_size: how many distinct verified tokens to remember; 0 disables the cache.

        Raises:
            ValueError: no public keys, or a negative cache size.
        """
        if not public_keys:
            raise ValueError("Verifier needs at least one public key")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self._public_keys = tuple(public_keys)
        self._revoked = revoked
        self._cache_size = cache_size
        self._cache: dict[str, Claims] = {}

    def check(self, claims: Claims, now: float) -> None:
        """Whether a key verified earlier is still good at `now`: not expired, not revoked. For
        credentials held by open connections (DESIGN: revocation applies to them within a second);
        no signature work.

        Raises:
            AuthError: 401 `expired_api_key` or `revoked_api_key`.
        """
        if claims.exp and now >= claims.exp:
            raise AuthError(401, "expired_api_key", f"API key {claims.kid} has expired")
        revoked = self._revoked
        if revoked is not None:
            revoked.maybe_reload(now)
            if claims.kid in revoked:
                raise AuthError(401, "revoked_api_key", f"API key {claims.kid} has been revoked")

    def refresh(self) -> None:
        """Re-read the revocation list now if its file changed (a watcher calls this more often than
        the once a second `verify` and `check` do)."""
        if self._revoked is not None:
            self._revoked.refresh()

    def verify(self, token: str | bytes | None, now: float, scope: str) -> Claims:
        """Check `token` at time `now` (unix seconds) for `scope`.

        `token` may be an Authorization header value: a leading "Bearer " (any case) is accepted, as
        are bytes (decoded as latin-1).

        Returns:
            The token's claims.

        Raises:
            AuthError: 401 `missing_api_key`, `invalid_api_key` (bad format or signature),
                `expired_api_key` or `revoked_api_key`; 403 `insufficient_scope`.
        """
        if not token:
            raise AuthError(401, "missing_api_key", "no API key given; send 'Authorization: Bearer csk_...'")
        if not isinstance(token, str):
            token = _to_str(token)
        claims = self._cache.get(token)
        if claims is None:
            claims = self._verify_signature(token)
        self.check(claims, now)
        if scope not in claims.scopes:
            raise AuthError(
                403,
                "insufficient_scope",
                f"API key {claims.kid} lacks the {scope!r} scope (has: {', '.join(claims.scopes) or 'none'})",
            )
        return claims

    def clear_cache(self) -> None:
        """Forget every verified token (the next verify of each pays the full check again)."""
        self._cache.clear()

    def _verify_signature(self, raw: str) -> Claims:
        """Full check of a token that is not cached; caches it if the signature verifies."""
        token = raw.strip()
        scheme, _, rest = token.partition(" ")
        if scheme.lower() == "bearer":
            token = rest.strip()
        if not token:
            raise AuthError(401, "missing_api_key", "no API key given; send 'Authorization: Bearer csk_...'")
        claims = _decode(token, self._public_keys)
        cache = self._cache
        if self._cache_size:
            if len(cache) >= self._cache_size:
                cache.pop(next(iter(cache)), None)  # oldest first: dicts keep insertion order
            cache[raw] = claims
        return claims


def _decode(token: str, public_keys: tuple[Ed25519PublicKey, ...]) -> Claims:
    """Parse a token and check its signature; expiry, revocation and scope are the caller's.

    Raises:
        AuthError: 401 `invalid_api_key`.
    """
    if len(token) > MAX_TOKEN_LENGTH:
        raise _invalid(f"API key is longer than {MAX_TOKEN_LENGTH} characters")
    if not token.startswith(TOKEN_PREFIX):
        raise _invalid(f"API key does not start with {TOKEN_PREFIX!r}")
    body, dot, sig_text = token[len(TOKEN_PREFIX) :].partition(".")
    if not dot:
        raise _invalid("API key is malformed (no signature part)")
    try:
        payload = b64url_decode(body)
        signature = b64url_decode(sig_text)
    except ValueError as exc:
        raise _invalid("API key is malformed (bad base64)") from exc
    if len(signature) != _SIGNATURE_SIZE:
        raise _invalid("API key is malformed (bad signature length)")
    message = _DOMAIN + payload
    for key in public_keys:
        try:
            key.verify(signature, message)
            break
        except InvalidSignature:
            continue
    else:
        raise _invalid("API key signature does not verify (not issued by this deployment, or altered)")
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as exc:  # signed by us but unreadable: a newer, incompatible format
        raise _invalid("API key payload cannot be decoded") from exc


def _invalid(message: str) -> AuthError:
    return AuthError(401, "invalid_api_key", message)


def _to_str(token: object) -> str:
    if isinstance(token, bytes | bytearray | memoryview):
        return bytes(token).decode("latin-1")
    raise AuthError(401, "invalid_api_key", f"API key must be str or bytes, not {type(token).__name__}")


def b64url_encode(data: bytes) -> str:
    """base64url without padding (API keys, session tokens)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding: only the canonical encoding of some bytes is accepted.

    Raises:
        ValueError: anything else (other characters, padding, non-zero trailing bits).
    """
    try:
        data = text.encode("ascii")
        raw = base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError("not base64url") from exc
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != data:
        raise ValueError("not canonical base64url")
    return raw
