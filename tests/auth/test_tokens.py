"""Tokens and their verification: the wire format, every refusal with its status and code, the cache,
and the revocation list that verification polls."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from casola.auth import (
    SCOPE_INGRESS,
    SCOPE_RUN,
    SCOPE_WORKER,
    AuthError,
    Claims,
    RevocationList,
    Verifier,
    sign_token,
)

NOW = 1_700_000_000.0


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def revoked_path(tmp_path: Path) -> Path:
    return tmp_path / "revoked.txt"


@pytest.fixture
def verifier(key: Ed25519PrivateKey, revoked_path: Path) -> Verifier:
    return Verifier([key.public_key()], RevocationList(revoked_path))


def user_claims(**kw: object) -> Claims:
    fields: dict[str, object] = {"kid": "k_0123456789ab", "tenant": "acme", "scopes": (SCOPE_RUN,), "iat": int(NOW)}
    fields.update(kw)
    return Claims(**fields)  # type: ignore[arg-type]


def write_revoked(path: Path, text: str) -> None:
    """Rewrite the file the way `KeyStore.revoke` does: a temporary file, then os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def refusal(verifier: Verifier, token: str | bytes | None, scope: str = SCOPE_RUN, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now, scope)
    return info.value


# -- format and round trip ---------------------------------------------------------------------------


def test_sign_then_verify_returns_the_claims(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    claims = user_claims(region="eu-west", exp=int(NOW) + 60)
    assert verifier.verify(sign_token(key, claims), NOW, SCOPE_RUN) == claims


def test_token_is_prefix_payload_dot_signature_unpadded(key: Ed25519PrivateKey) -> None:
    token = sign_token(key, user_claims())
    assert token.startswith("csk_")
    payload, signature = token[4:].split(".")
    assert "=" not in token
    assert len(unb64(signature)) == 64
    key.public_key().verify(unb64(signature), b"casola-key-v1\x00" + unb64(payload))  # raises if not


def test_bearer_prefix_in_any_case_and_bytes_are_accepted(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    token = sign_token(key, user_claims())
    for given in (
        f"Bearer {token}",
        f"bearer {token}",
        f"BEARER  {token} ",
        token.encode(),
        b"Bearer " + token.encode(),
    ):
        assert verifier.verify(given, NOW, SCOPE_RUN).kid == "k_0123456789ab"


def test_any_of_several_public_keys_may_have_signed(key: Ed25519PrivateKey) -> None:
    old = Ed25519PrivateKey.generate()
    verifier = Verifier([old.public_key(), key.public_key()])
    assert verifier.verify(sign_token(old, user_claims()), NOW, SCOPE_RUN).tenant == "acme"
    assert verifier.verify(sign_token(key, user_claims()), NOW, SCOPE_RUN).tenant == "acme"


# -- 401 refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", b"", "Bearer ", "   "])
def test_missing_key_is_401_missing_api_key(verifier: Verifier, token: str | bytes | None) -> None:
    err = refusal(verifier, token)
    assert (err.status, err.code) == (401, "missing_api_key")


@pytest.mark.parametrize(
    "token",
    ["hello", "csk_", "csk_.", "csk_abc", "csk_!!!.???", "csk_AAAA.AAAA", "Basic dXNlcjpwYXNz", "csk_" + "A" * 5000],
)
def test_garbage_is_401_invalid_api_key(verifier: Verifier, token: str) -> None:
    err = refusal(verifier, token)
    assert (err.status, err.code) == (401, "invalid_api_key")


def test_wrong_prefix_is_401_invalid(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    token = sign_token(key, user_claims())
    assert refusal(verifier, "sk_" + token[4:]).code == "invalid_api_key"
    assert refusal(verifier, "CSK_" + token[4:]).code == "invalid_api_key"


def test_tampered_payload_is_401_invalid(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    payload, signature = sign_token(key, user_claims())[4:].split(".")
    raw = bytearray(unb64(payload))
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        assert refusal(verifier, f"csk_{b64(bytes(tampered))}.{signature}").code == "invalid_api_key"


def test_payload_claiming_more_scopes_is_401_invalid(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    import msgspec

    _payload, signature = sign_token(key, user_claims())[4:].split(".")
    forged = msgspec.msgpack.encode(user_claims(scopes=(SCOPE_RUN, SCOPE_WORKER, SCOPE_INGRESS)))
    assert refusal(verifier, f"csk_{b64(forged)}.{signature}", SCOPE_WORKER).code == "invalid_api_key"


def test_tampered_signature_is_401_invalid(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    payload, signature = sign_token(key, user_claims())[4:].split(".")
    raw = bytearray(unb64(signature))
    raw[10] ^= 0x80
    assert refusal(verifier, f"csk_{payload}.{b64(bytes(raw))}").code == "invalid_api_key"
    assert refusal(verifier, f"csk_{payload}.{b64(bytes(raw[:-1]))}").code == "invalid_api_key"


def test_non_canonical_base64_is_401_invalid(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    token = sign_token(key, user_claims())
    payload, signature = token[4:].split(".")
    assert refusal(verifier, f"csk_{payload}=.{signature}").code == "invalid_api_key"
    assert refusal(verifier, f"csk_{payload[:3]} {payload[3:]}.{signature}").code == "invalid_api_key"


def test_token_from_another_signing_key_is_401_invalid(verifier: Verifier) -> None:
    stranger = Ed25519PrivateKey.generate()
    assert refusal(verifier, sign_token(stranger, user_claims())).code == "invalid_api_key"


def test_expired_is_401_from_exp_onwards(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    token = sign_token(key, user_claims(exp=int(NOW) + 10))
    assert verifier.verify(token, NOW + 9.999, SCOPE_RUN).exp == int(NOW) + 10
    err = refusal(verifier, token, now=NOW + 10)
    assert (err.status, err.code) == (401, "expired_api_key")


def test_exp_zero_never_expires(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    assert verifier.verify(sign_token(key, user_claims(exp=0)), 1e12, SCOPE_RUN).exp == 0


def test_revoked_is_401_revoked(key: Ed25519PrivateKey, revoked_path: Path) -> None:
    write_revoked(revoked_path, "# revoked\nk_0123456789ab\n")
    verifier = Verifier([key.public_key()], RevocationList(revoked_path))
    err = refusal(verifier, sign_token(key, user_claims()))
    assert (err.status, err.code) == (401, "revoked_api_key")
    assert verifier.verify(sign_token(key, user_claims(kid="k_other")), NOW, SCOPE_RUN).kid == "k_other"


def test_messages_never_echo_the_token(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    token = sign_token(key, user_claims(exp=int(NOW)))
    payload, signature = token[4:].split(".")
    for err in (refusal(verifier, token), refusal(verifier, token + "x"), refusal(verifier, token[:-3])):
        assert payload not in str(err) and signature[:20] not in str(err) and err.message == str(err)


# -- 403 refusals ------------------------------------------------------------------------------------


def test_valid_key_without_the_scope_is_403(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    err = refusal(verifier, sign_token(key, user_claims()), SCOPE_INGRESS)
    assert (err.status, err.code) == (403, "insufficient_scope")


def test_user_key_cannot_register_a_worker_and_worker_key_cannot_submit(
    key: Ed25519PrivateKey, verifier: Verifier
) -> None:
    user = sign_token(key, user_claims(scopes=(SCOPE_RUN,)))
    worker = sign_token(key, user_claims(kid="k_worker", scopes=(SCOPE_WORKER,)))
    assert refusal(verifier, user, SCOPE_WORKER).status == 403
    assert refusal(verifier, worker, SCOPE_RUN).status == 403
    assert verifier.verify(worker, NOW, SCOPE_WORKER).kid == "k_worker"


# -- the cache ---------------------------------------------------------------------------------------


def test_repeat_verify_returns_the_cached_claims(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    token = sign_token(key, user_claims())
    assert verifier.verify(token, NOW, SCOPE_RUN) is verifier.verify(token, NOW + 1, SCOPE_RUN)


def test_without_a_cache_every_verify_decodes_afresh(key: Ed25519PrivateKey) -> None:
    token = sign_token(key, user_claims())
    verifier = Verifier([key.public_key()], cache_size=0)
    first = verifier.verify(token, NOW, SCOPE_RUN)
    assert first == verifier.verify(token, NOW, SCOPE_RUN) and first is not verifier.verify(token, NOW, SCOPE_RUN)


def test_cache_is_bounded_and_evicts_the_oldest(key: Ed25519PrivateKey) -> None:
    a, b = sign_token(key, user_claims(kid="k_a")), sign_token(key, user_claims(kid="k_b"))
    verifier = Verifier([key.public_key()], cache_size=1)
    first_a = verifier.verify(a, NOW, SCOPE_RUN)
    first_b = verifier.verify(b, NOW, SCOPE_RUN)  # evicts a
    assert verifier.verify(b, NOW, SCOPE_RUN) is first_b
    assert verifier.verify(a, NOW, SCOPE_RUN) is not first_a


def test_refused_tokens_do_not_evict_cached_ones(key: Ed25519PrivateKey) -> None:
    good = sign_token(key, user_claims())
    verifier = Verifier([key.public_key()], cache_size=1)
    cached = verifier.verify(good, NOW, SCOPE_RUN)
    for i in range(20):
        refusal(verifier, f"csk_garbage{i}")
        refusal(verifier, sign_token(Ed25519PrivateKey.generate(), user_claims()))
    assert verifier.verify(good, NOW, SCOPE_RUN) is cached


def test_cached_token_is_still_checked_for_expiry_and_scope(key: Ed25519PrivateKey, verifier: Verifier) -> None:
    token = sign_token(key, user_claims(exp=int(NOW) + 5))
    verifier.verify(token, NOW, SCOPE_RUN)
    assert refusal(verifier, token, SCOPE_WORKER).code == "insufficient_scope"
    assert refusal(verifier, token, now=NOW + 5).code == "expired_api_key"


def test_revoking_after_caching_refuses_once_the_list_is_rechecked(
    key: Ed25519PrivateKey, verifier: Verifier, revoked_path: Path
) -> None:
    token = sign_token(key, user_claims())
    assert verifier.verify(token, NOW, SCOPE_RUN).kid == "k_0123456789ab"  # cached; list checked at NOW
    write_revoked(revoked_path, "k_0123456789ab\n")
    assert verifier.verify(token, NOW + 0.5, SCOPE_RUN).kid == "k_0123456789ab"  # within the 1 s staleness
    err = refusal(verifier, token, now=NOW + 1.5)
    assert (err.status, err.code) == (401, "revoked_api_key")


# -- the revocation list -----------------------------------------------------------------------------


def test_missing_revocation_file_revokes_nothing(revoked_path: Path) -> None:
    revoked = RevocationList(revoked_path)
    assert "k_any" not in revoked and len(revoked) == 0
    assert "k_any" not in RevocationList(None)


def test_revocation_file_ignores_comments_and_blank_lines(revoked_path: Path) -> None:
    write_revoked(revoked_path, "# header\n\n  k_one  \nk_two # why\n#k_three\n")
    revoked = RevocationList(revoked_path)
    assert "k_one" in revoked and "k_two" in revoked
    assert "k_three" not in revoked and "# header" not in revoked and len(revoked) == 2


def test_reload_reports_whether_the_list_changed(revoked_path: Path) -> None:
    revoked = RevocationList(revoked_path)
    assert revoked.reload() is False
    write_revoked(revoked_path, "k_one\n")
    assert revoked.reload() is True and "k_one" in revoked
    assert revoked.reload() is False
    revoked_path.unlink()
    assert revoked.reload() is True and "k_one" not in revoked


def test_maybe_reload_checks_the_file_at_most_once_a_second(revoked_path: Path) -> None:
    revoked = RevocationList(revoked_path)
    assert revoked.maybe_reload(NOW) is False  # checked: nothing there
    write_revoked(revoked_path, "k_one\n")
    assert revoked.maybe_reload(NOW + 0.999) is False and "k_one" not in revoked  # not looked at
    assert revoked.maybe_reload(NOW + 1.0) is True and "k_one" in revoked
    write_revoked(revoked_path, "k_one\nk_two\n")
    assert revoked.maybe_reload(NOW + 1.5) is False and "k_two" not in revoked
    assert revoked.maybe_reload(NOW + 2.0) is True and "k_two" in revoked
    assert revoked.maybe_reload(NOW + 3.0) is False  # checked, unchanged


def test_maybe_reload_checks_at_once_when_the_clock_steps_back(revoked_path: Path) -> None:
    revoked = RevocationList(revoked_path)
    revoked.maybe_reload(NOW)
    write_revoked(revoked_path, "k_one\n")
    assert revoked.maybe_reload(NOW - 3600) is True and "k_one" in revoked


def test_verifier_rejects_a_useless_configuration(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError):
        Verifier([])
    with pytest.raises(ValueError):
        Verifier([key.public_key()], cache_size=-1)
