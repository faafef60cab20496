"""A key's content-filter policy: carried in its token (appended last, so older tokens still verify),
recorded in keys.json, validated at creation, settable from `casola keys create --filter`."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import get_args

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from casola.auth import FILTER_POLICIES, SCOPE_RUN, Claims, KeyStore, Verifier
from casola.auth.tokens import TOKEN_PREFIX
from casola.wire.meta import FilterPolicy
from tests.auth.test_cli import casola


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def test_the_policies_are_the_wire_s() -> None:
    assert set(FILTER_POLICIES) == set(get_args(FilterPolicy))


def test_filter_is_appended_after_the_first_six_claims() -> None:
    names = [f.name for f in msgspec.structs.fields(Claims)]
    assert names[:7] == ["kid", "tenant", "scopes", "region", "exp", "iat", "filter"]
    assert Claims("k_1", "acme", (SCOPE_RUN,)).filter == ""


@pytest.mark.parametrize("policy", FILTER_POLICIES)
def test_create_puts_the_policy_in_the_token_and_keys_json(tmp_path: Path, policy: str) -> None:
    store = KeyStore(tmp_path)
    claims, token = store.create("acme", [SCOPE_RUN], filter=policy)
    assert claims.filter == policy
    assert store.verifier().verify(token, time.time(), SCOPE_RUN).filter == policy
    assert store.list()[0]["filter"] == policy


@pytest.mark.parametrize("policy", ["strict", "BLOCK", " race", None])
def test_create_refuses_an_unknown_policy(tmp_path: Path, policy: str) -> None:
    with pytest.raises(ValueError, match="filter"):
        KeyStore(tmp_path).create("acme", [SCOPE_RUN], filter=policy)
    assert KeyStore(tmp_path).list() == []


def test_a_token_signed_before_keys_had_a_policy_still_verifies() -> None:
    key = Ed25519PrivateKey.generate()
    payload = msgspec.msgpack.encode(["k_000000000001", "acme", ["run"], "", 0, 0])  # the 6-field layout
    token = TOKEN_PREFIX + _b64(payload) + "." + _b64(key.sign(b"casola-key-v1\x00" + payload))
    claims = Verifier([key.public_key()]).verify(token, time.time(), SCOPE_RUN)
    assert (claims.tenant, claims.filter) == ("acme", "")


def test_cli_create_with_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path)]
    assert casola([*state, "keys", "create", "--tenant", "acme", "--filter", "block"]) == 0
    out, err = capsys.readouterr()
    claims = KeyStore(tmp_path).verifier().verify(out.strip(), time.time(), SCOPE_RUN)
    assert claims.filter == "block" and "filter block" in err
    assert casola([*state, "keys", "list"]) == 0
    _header, row = capsys.readouterr().out.splitlines()
    assert row.split()[5] == "block"
    assert casola([*state, "keys", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["filter"] == "block"


@pytest.mark.parametrize("bad", [["--filter", "strict"], ["--filter", ""], ["--filter"]])
def test_cli_refuses_an_unknown_filter(tmp_path: Path, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        casola(["--state-dir", str(tmp_path), "keys", "create", "--tenant", "acme", *bad])
    assert info.value.code == 2


def test_keys_json_written_before_keys_had_a_policy_lists_a_dash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    KeyStore(tmp_path).create("acme", [SCOPE_RUN])
    path = tmp_path / "keys.json"
    doc = json.loads(path.read_text())
    del doc["keys"][0]["filter"]
    path.write_text(json.dumps(doc))
    assert casola(["--state-dir", str(tmp_path), "keys", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[5] == "-"
