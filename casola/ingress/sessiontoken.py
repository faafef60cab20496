"""Short-lived realtime session tokens: what a browser puts in `GET /v1/realtime?token=...`, since it
cannot set an `Authorization` header on a WebSocket. `POST /v1/realtime/sessions`, authenticated by an
API key, mints one (casola/ingress/realtime.py).

Wire format::

    cst_<b64(payload)>.<b64(mac)>

    payload = msgpack(Grant), an array: [version, kid, tenant, region, filter, max_priority,
              max_inflight, key_exp, exp, model, nonce]
    mac     = HMAC-SHA256(secret, b"casola-session-v1\\x00" + payload)   (32 bytes)
    b64     = base64url, no "=" padding

The grant copies the API key's claims (tenant, region pin, filter policy, priority and in-flight
limits, the key's own expiry), so a token can do exactly what its key could, for at most `ttl`
seconds, for one WebSocket (it is spent when used), and for one model when minted for one. It is
checked again against the key at use: a key revoked or expired since the token was minted makes the
token worthless too.

The secret is random per `SessionTokens` (per ingress process): the ingress has a `Verifier`, not
the deployment's signing key, so a token is valid at the ingress that minted it and nowhere else. A
client that mints behind a load balancer must reach the same ingress (the `url` of the answer names
the host it asked), or the deployment gives its ingresses one secret (`SessionTokens(secret)`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

import msgspec

from casola.auth import SCOPE_RUN, AuthError, Claims
from casola.auth.tokens import b64url_decode, b64url_encode

__all__ = ["DEFAULT_TTL", "PREFIX", "Grant", "SessionTokens"]

PREFIX: Final = "cst_"
DEFAULT_TTL: Final = 60  # seconds: long enough to pass a token to a page and connect, short if it leaks
_VERSION: Final = 1
_DOMAIN: Final = b"casola-session-v1\x00"
_MAC_SIZE: Final = 32
_MAX_LENGTH: Final = 2048  # a grant is ~120 bytes; longer input is refused before any decoding
_PRUNE_AT: Final = 4096  # spent nonces kept before the expired ones are forgotten


class Grant(msgspec.Struct, frozen=True, array_like=True):
    """What a session token carries; trusted once its MAC verifies."""

    version: int
    kid: str  # the API key's id ("" with auth off)
    tenant: str
    region: str
    filter: str
    max_priority: int
    max_inflight: int
    key_exp: int  # the API key's expiry, unix seconds (0: none)
    exp: int  # the token's, unix seconds
    model: str  # "" = any model
    nonce: bytes

    def claims(self) -> Claims:
        """The key's claims as the token carries them (for `Verifier.check` and the caller)."""
        return Claims(self.kid, self.tenant, (SCOPE_RUN,), self.region, self.key_exp, 0, self.filter,
                      self.max_priority, self.max_inflight)  # fmt: skip


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Grant)


class SessionTokens:
    """Mints and checks session tokens with one secret; remembers the spent ones until they expire."""

    __slots__ = ("_secret", "_spent", "ttl")

    def __init__(self, secret: bytes | None = None, ttl: int = DEFAULT_TTL) -> None:
        """Args:
            secret: the HMAC key, 32 bytes or more; None makes a random one (valid in this process only).
            ttl: seconds a token is valid for.

        Raises:
            ValueError: a secret shorter than 32 bytes, or ttl < 1.
        """
        if secret is not None and len(secret) < 32:
            raise ValueError("a session-token secret must be at least 32 bytes")
        if ttl < 1:
            raise ValueError("session token ttl must be at least 1 second")
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._spent: dict[bytes, int] = {}  # nonce -> the token's exp
        self.ttl = ttl

    def mint(self, claims: Claims | None, tenant: str, now: float, model: str = "") -> tuple[str, int]:
        """A token for the holder of `claims` (None: auth is off, `tenant` then names the caller).

        Returns:
            (token, expires_at): expires_at in unix seconds, never after the key's own expiry.

        Raises:
            Nothing.
        """
        exp = int(now) + self.ttl
        if claims is None:
            grant = Grant(_VERSION, "", tenant, "", "", 127, 0, 0, exp, model, secrets.token_bytes(16))
        else:
            if claims.exp:
                exp = min(exp, claims.exp)
            grant = Grant(_VERSION, claims.kid, claims.tenant, claims.region, claims.filter, claims.max_priority,
                          claims.max_inflight, claims.exp, exp, model, secrets.token_bytes(16))  # fmt: skip
        payload = _encoder.encode(grant)
        return PREFIX + b64url_encode(payload) + "." + b64url_encode(self._mac(payload)), exp

    def check(self, token: str, now: float) -> Grant:
        """Check a token at `now` (unix seconds); `spend` it once it has opened its WebSocket.

        Returns:
            Its grant. The caller still checks the key behind it (`Verifier.check(grant.claims(), now)`).

        Raises:
            AuthError: 401 `invalid_session_token` (malformed, or not minted here), `expired_session_token`,
                or `spent_session_token` (used already).
        """
        grant = self._decode(token)
        if now >= grant.exp:
            raise AuthError(401, "expired_session_token", "the session token has expired: mint a new one")
        if grant.nonce in self._spent:
            raise AuthError(401, "spent_session_token", "the session token was used already: mint one per connection")
        return grant

    def spend(self, grant: Grant, now: float) -> None:
        """`grant`'s token has been used: `check` refuses it from now on (until it expires anyway)."""
        spent = self._spent
        if len(spent) >= _PRUNE_AT:
            self._spent = spent = {n: e for n, e in spent.items() if e > now}
        spent[grant.nonce] = grant.exp

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, _DOMAIN + payload, hashlib.sha256).digest()

    def _decode(self, token: str) -> Grant:
        if len(token) > _MAX_LENGTH or not token.startswith(PREFIX):
            raise _invalid("not a session token (they start with 'cst_')")
        body, dot, mac_text = token[len(PREFIX) :].partition(".")
        try:
            payload, mac = b64url_decode(body), b64url_decode(mac_text)
        except ValueError:
            raise _invalid("the session token is malformed") from None
        if not dot or len(mac) != _MAC_SIZE or not hmac.compare_digest(mac, self._mac(payload)):
            raise _invalid("the session token does not verify (altered, or minted by another ingress)")
        try:
            grant = _decoder.decode(payload)
        except msgspec.DecodeError:
            raise _invalid("the session token cannot be read") from None
        if grant.version != _VERSION:
            raise _invalid(f"session token version {grant.version} is not supported")
        return grant


def _invalid(message: str) -> AuthError:
    return AuthError(401, "invalid_session_token", message)
