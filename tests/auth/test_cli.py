"""`casola keys create | revoke | list` against a state directory in tmp_path."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from casola.auth import SCOPE_RUN, SCOPE_WORKER, AuthError, KeyStore
from casola.auth.cli import add_keys_parser, run_keys


def casola(argv: list[str]) -> int:
    """Parse like the real `casola` entry point (global --state-dir, then commands) and run `keys`."""
    parser = argparse.ArgumentParser(prog="casola")
    parser.add_argument("--state-dir", default="./.casola")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    return run_keys(parser.parse_args(argv))


def test_create_prints_only_the_token_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert casola(["--state-dir", str(tmp_path), "keys", "create", "--tenant", "acme"]) == 0
    out, err = capsys.readouterr()
    token = out.splitlines()[0]
    assert out == token + "\n" and token.startswith("csk_")
    claims = KeyStore(tmp_path).verifier().verify(token, time.time(), SCOPE_RUN)
    assert (claims.tenant, claims.scopes, claims.exp) == ("acme", (SCOPE_RUN,), 0)
    assert f"created key {claims.kid} for tenant acme (scopes: run" in err


def test_create_with_scopes_region_ttl_and_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["keys", "create", "--tenant", "acme", "--scope", "worker", "--scope", "run"]
    argv += ["--region", "eu-west", "--ttl", "600", "--name", "ci", "--state-dir", str(tmp_path)]
    assert casola(argv) == 0
    token = capsys.readouterr().out.splitlines()[0]
    claims = KeyStore(tmp_path).verifier().verify(token, time.time(), SCOPE_WORKER)
    assert (claims.scopes, claims.region, claims.exp - claims.iat) == ((SCOPE_WORKER, SCOPE_RUN), "eu-west", 600)
    assert KeyStore(tmp_path).list()[0]["name"] == "ci"


@pytest.mark.parametrize("bad", [["--scope", "admin"], ["--ttl", "-5"], ["--ttl", "soon"], []])
def test_create_refuses_bad_arguments_with_usage_errors(tmp_path: Path, bad: list[str]) -> None:
    tenant = ["--tenant", "acme"] if bad else []
    with pytest.raises(SystemExit) as info:
        casola(["--state-dir", str(tmp_path), "keys", "create", *tenant, *bad])
    assert info.value.code == 2


def test_create_list_revoke_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path)]
    casola([*state, "keys", "create", "--tenant", "acme", "--name", "laptop"])
    token = capsys.readouterr().out.strip()
    kid = KeyStore(tmp_path).list()[0]["kid"]
    assert isinstance(kid, str)

    assert casola([*state, "keys", "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    columns = ["kid", "name", "tenant", "scopes", "region", "filter", "max_priority", "max_inflight", "expires"]
    assert header.split() == [*columns, "revoked"]
    assert row.split() == [kid, "laptop", "acme", "run", "-", "-", "0", "-", "never", "no"]
    assert token not in header + row

    assert casola(["keys", "revoke", kid, *state]) == 0
    assert kid in capsys.readouterr().out
    with pytest.raises(AuthError, match="revoked"):
        KeyStore(tmp_path).verifier().verify(token, time.time(), SCOPE_RUN)

    assert casola(["keys", *state, "list", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert (record["kid"], record["revoked"]) == (kid, True)


def test_revoke_of_an_unknown_kid_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert casola(["--state-dir", str(tmp_path), "keys", "revoke", "k_000000000000"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "k_000000000000" in err


def test_list_of_an_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert casola(["--state-dir", str(tmp_path), "keys", "list"]) == 0
    assert capsys.readouterr().out == ""
    assert casola(["--state-dir", str(tmp_path), "keys", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_state_dir_may_be_given_globally_or_after_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = {name: tmp_path / name for name in ("global", "keys-level", "sub-level")}
    casola(["--state-dir", str(where["global"]), "keys", "create", "--tenant", "a"])
    casola(["--state-dir", "/nonexistent", "keys", "--state-dir", str(where["keys-level"]), "create", "--tenant", "b"])
    casola(["--state-dir", "/nonexistent", "keys", "create", "--tenant", "c", "--state-dir", str(where["sub-level"])])
    capsys.readouterr()
    assert [KeyStore(where[n]).list()[0]["tenant"] for n in ("global", "keys-level", "sub-level")] == ["a", "b", "c"]
