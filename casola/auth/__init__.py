"""Local API-key auth: Ed25519-signed tokens, their verification per request, and the key store behind them.

`KeyStore` issues and revokes keys in a state directory; `Verifier.verify(token, now, scope)` checks a
token (cached after its first signature check) and raises `AuthError` with the HTTP status to answer.
"""

from __future__ import annotations

from casola.auth.keystore import KeyStore, UnknownKeyError
from casola.auth.revocation import RevocationList
from casola.auth.tokens import (
    ALL_SCOPES,
    FILTER_POLICIES,
    SCOPE_INGRESS,
    SCOPE_METRICS,
    SCOPE_RUN,
    SCOPE_SIGNALS,
    SCOPE_WORKER,
    AuthError,
    Claims,
    Verifier,
    sign_token,
)
from casola.auth.watch import CredentialWatch

__all__ = [
    "ALL_SCOPES",
    "FILTER_POLICIES",
    "SCOPE_INGRESS",
    "SCOPE_METRICS",
    "SCOPE_RUN",
    "SCOPE_SIGNALS",
    "SCOPE_WORKER",
    "AuthError",
    "Claims",
    "CredentialWatch",
    "KeyStore",
    "RevocationList",
    "UnknownKeyError",
    "Verifier",
    "sign_token",
]
