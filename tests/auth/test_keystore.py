"""The key store: the signing key file, keys.json metadata, revocation, and tokens kept for the node itself."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from casola.auth import SCOPE_INGRESS, SCOPE_RUN, SCOPE_WORKER, AuthError, KeyStore, UnknownKeyError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_public(store: KeyStore) -> bytes:
    return store.public_keys()[0].public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / ".casola"


# -- the signing key ---------------------------------------------------------------------------------


def test_signing_key_is_created_as_pkcs8_pem_mode_0600_in_a_0700_dir(state_dir: Path) -> None:
    KeyStore(state_dir).signing_key()
    pem = state_dir / "signing-key.pem"
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert mode(pem) == 0o600
    assert mode(state_dir) == 0o700
    assert [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_signing_key_is_reused_across_instances(state_dir: Path) -> None:
    first = KeyStore(state_dir)
    _claims, token = first.create("acme", [SCOPE_RUN])
    second = KeyStore(state_dir)
    assert raw_public(second) == raw_public(first)
    assert second.verifier().verify(token, time.time(), SCOPE_RUN).tenant == "acme"


def test_a_corrupt_signing_key_is_a_clear_error(state_dir: Path) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / "signing-key.pem").write_text("not a key")
    with pytest.raises(ValueError, match=r"signing-key\.pem"):
        KeyStore(state_dir).signing_key()


# -- create and keys.json ----------------------------------------------------------------------------


def test_create_records_metadata_but_never_the_token(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    claims, token = store.create("acme", [SCOPE_RUN, SCOPE_WORKER], region="eu-west", ttl_s=3600, name="ci")
    text = (state_dir / "keys.json").read_text()
    payload, signature = token[4:].split(".")
    assert token not in text and payload not in text and signature not in text
    assert store.list() == [
        {
            "kid": claims.kid,
            "name": "ci",
            "tenant": "acme",
            "scopes": ["run", "worker"],
            "region": "eu-west",
            "exp": claims.iat + 3600,
            "iat": claims.iat,
            "filter": "",
            "max_priority": 0,
            "max_inflight": 0,
            "revoked": False,
        }
    ]
    assert json.loads(text)["keys"][0]["kid"] == claims.kid


def test_created_key_verifies_and_expires_after_its_ttl(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    claims, token = store.create("acme", [SCOPE_RUN], ttl_s=60)
    assert claims.kid.startswith("k_") and len(claims.kid) == 14
    verifier = store.verifier()
    assert verifier.verify(token, claims.iat + 59, SCOPE_RUN) == claims
    with pytest.raises(AuthError) as info:
        verifier.verify(token, claims.iat + 60, SCOPE_RUN)
    assert info.value.code == "expired_api_key"


def test_every_key_gets_its_own_kid_and_all_are_listed(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    kids = [store.create(f"t{i}", [SCOPE_RUN])[0].kid for i in range(5)]
    assert len(set(kids)) == 5
    assert [r["kid"] for r in KeyStore(state_dir).list()] == kids


@pytest.mark.parametrize(
    ("tenant", "scopes", "ttl_s"), [("", [SCOPE_RUN], 0), ("acme", [], 0), ("acme", "run", 0), ("acme", [""], 0)]
)
def test_create_refuses_bad_arguments(state_dir: Path, tenant: str, scopes: list[str], ttl_s: int) -> None:
    with pytest.raises(ValueError):
        KeyStore(state_dir).create(tenant, scopes, ttl_s=ttl_s)


def test_create_refuses_a_negative_ttl(state_dir: Path) -> None:
    with pytest.raises(ValueError, match="ttl"):
        KeyStore(state_dir).create("acme", [SCOPE_RUN], ttl_s=-1)


def test_a_corrupt_keys_json_is_a_clear_error(state_dir: Path) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / "keys.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"keys\.json"):
        KeyStore(state_dir).list()


# -- revoke ------------------------------------------------------------------------------------------


def test_revoke_marks_keys_json_and_appends_to_revoked_txt(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    claims, token = store.create("acme", [SCOPE_RUN])
    keep, _ = store.create("acme", [SCOPE_RUN])
    store.revoke(claims.kid)
    assert {r["kid"]: r["revoked"] for r in store.list()} == {claims.kid: True, keep.kid: False}
    lines = (state_dir / "revoked.txt").read_text().splitlines()
    assert claims.kid in lines and keep.kid not in lines
    with pytest.raises(AuthError) as info:
        store.verifier().verify(token, time.time(), SCOPE_RUN)
    assert info.value.code == "revoked_api_key"


def test_revoking_twice_lists_the_kid_once(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    claims, _ = store.create("acme", [SCOPE_RUN])
    store.revoke(claims.kid)
    store.revoke(claims.kid)
    assert (state_dir / "revoked.txt").read_text().splitlines().count(claims.kid) == 1


def test_revoking_an_unknown_kid_is_a_key_error_naming_it(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    store.create("acme", [SCOPE_RUN])
    with pytest.raises(KeyError) as info:
        store.revoke("k_nosuchkey000")
    assert isinstance(info.value, UnknownKeyError)
    assert "k_nosuchkey000" in str(info.value)
    assert not (state_dir / "revoked.txt").exists()


def test_a_running_verifier_sees_a_revocation_from_another_store(state_dir: Path) -> None:
    claims, token = KeyStore(state_dir).create("acme", [SCOPE_RUN])
    verifier = KeyStore(state_dir).verifier()
    now = time.time()
    verifier.verify(token, now, SCOPE_RUN)
    KeyStore(state_dir).revoke(claims.kid)
    with pytest.raises(AuthError, match="revoked"):
        verifier.verify(token, now + 1.5, SCOPE_RUN)


# -- ensure_key --------------------------------------------------------------------------------------


def test_ensure_key_stores_the_token_0600_and_returns_it_again(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    token = store.ensure_key("worker-key", "local", [SCOPE_WORKER], "local worker")
    path = state_dir / "worker-key"
    assert path.read_text().strip() == token and mode(path) == 0o600
    assert KeyStore(state_dir).ensure_key("worker-key", "local", [SCOPE_WORKER], "local worker") == token
    assert [r["name"] for r in store.list()] == ["local worker"]
    assert store.verifier().verify(token, time.time(), SCOPE_WORKER).tenant == "local"


def test_ensure_key_issues_a_new_token_once_the_old_one_is_revoked(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    old = store.ensure_key("ingress-key", "local", [SCOPE_INGRESS], "ingress")
    store.revoke(store.list()[0]["kid"])  # type: ignore[arg-type]
    new = store.ensure_key("ingress-key", "local", [SCOPE_INGRESS], "ingress")
    assert new != old
    assert (state_dir / "ingress-key").read_text().strip() == new
    assert store.verifier().verify(new, time.time(), SCOPE_INGRESS).scopes == (SCOPE_INGRESS,)


def test_ensure_key_replaces_a_token_that_does_not_fit(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    first = store.ensure_key("dev-api-key", "local", [SCOPE_RUN], "dev")
    (state_dir / "dev-api-key").write_text("garbage\n")
    second = store.ensure_key("dev-api-key", "local", [SCOPE_RUN], "dev")
    assert second not in (first, "garbage")
    assert store.ensure_key("dev-api-key", "other-tenant", [SCOPE_RUN], "dev") != second
    assert store.ensure_key("dev-api-key", "other-tenant", [SCOPE_RUN, SCOPE_WORKER], "dev") != second


@pytest.mark.parametrize("filename", ["", "../escape", "sub/key", "keys.json", "signing-key.pem", "revoked.txt", ".."])
def test_ensure_key_refuses_paths_and_the_stores_own_files(state_dir: Path, filename: str) -> None:
    with pytest.raises(ValueError):
        KeyStore(state_dir).ensure_key(filename, "local", [SCOPE_RUN], "dev")
