"""Realtime session tokens (casola/ingress/sessiontoken.py): what they carry, expiry on an injected
clock, single use, tampering, another ingress's secret, and the bound of the spent set."""

from __future__ import annotations

import base64

import pytest

from casola.auth import AuthError, Claims
from casola.ingress.sessiontoken import SessionTokens

NOW = 1_800_000_000.0
KEY = Claims("k_abc", "acme", ("run",), "eu", int(NOW) + 3600, 0, "block", 5, 3)


def _code(tokens: SessionTokens, token: str, now: float) -> str:
    with pytest.raises(AuthError) as err:
        tokens.check(token, now)
    assert err.value.status == 401
    return err.value.code


def test_a_token_carries_its_keys_claims_and_model() -> None:
    tokens = SessionTokens(ttl=60)
    token, exp = tokens.mint(KEY, "acme", NOW, "voice")
    assert token.startswith("cst_") and exp == int(NOW) + 60
    assert len(token) < 300  # fits a URL comfortably
    grant = tokens.check(token, NOW + 59)
    assert (grant.model, grant.exp) == ("voice", exp)
    assert grant.claims() == Claims("k_abc", "acme", ("run",), "eu", KEY.exp, 0, "block", 5, 3)


def test_expired_at_ttl_and_never_after_the_key() -> None:
    tokens = SessionTokens(ttl=60)
    token, exp = tokens.mint(KEY, "acme", NOW)
    tokens.check(token, exp - 0.001)
    assert _code(tokens, token, exp) == "expired_session_token"
    short = Claims("k_s", "acme", ("run",), exp=int(NOW) + 10)
    _, exp2 = tokens.mint(short, "acme", NOW)
    assert exp2 == int(NOW) + 10  # the key expires first: so does its token


def test_a_token_is_spent_by_its_use() -> None:
    tokens = SessionTokens()
    token, _ = tokens.mint(KEY, "acme", NOW)
    other, _ = tokens.mint(KEY, "acme", NOW)
    tokens.spend(tokens.check(token, NOW), NOW)
    assert _code(tokens, token, NOW + 1) == "spent_session_token"
    tokens.check(other, NOW + 1)  # its own nonce: still good


def test_tampered_foreign_and_garbage_tokens_are_invalid() -> None:
    tokens = SessionTokens()
    token, _ = tokens.mint(KEY, "acme", NOW)
    body, _, mac = token[4:].partition(".")
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-20] ^= 1
    forged = "cst_" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode() + "." + mac
    for bad in [forged, token[:-2], "cst_x.y", "csk_" + token[4:], "", "cst_" + "a" * 5000, token + "="]:
        assert _code(tokens, bad, NOW) == "invalid_session_token", bad[:40]
    assert _code(SessionTokens(), token, NOW) == "invalid_session_token"  # another ingress's secret
    shared = b"s" * 32
    t2, _ = SessionTokens(shared).mint(KEY, "acme", NOW)
    SessionTokens(shared).check(t2, NOW)  # one secret given to several ingresses: valid at each


def test_spent_nonces_are_forgotten_once_expired() -> None:
    tokens = SessionTokens(ttl=1)
    key = Claims("k_forever", "acme", ("run",))
    for i in range(5000):
        tokens.spend(tokens.check(tokens.mint(key, "acme", NOW + i)[0], NOW + i), NOW + i)
    assert len(tokens._spent) <= 4097  # pruned: only tokens still valid are remembered


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        SessionTokens(b"short")
    with pytest.raises(ValueError):
        SessionTokens(ttl=0)
