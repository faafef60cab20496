"""The `casola keys` command: create, revoke and list API keys in the state directory.

`keys create` prints the token alone on stdout (so `TOKEN=$(casola keys create --tenant t)` works) and
says what it did on stderr. The state directory comes from `keys ... --state-dir` if given there, else
from the parent parser's global `--state-dir`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from casola.auth.keystore import KeyStore, UnknownKeyError
from casola.auth.tokens import ALL_SCOPES, FILTER_POLICIES, SCOPE_RUN

__all__ = ["add_keys_parser", "run_keys"]

_COLUMNS = ("kid", "name", "tenant", "scopes", "region", "filter", "max_priority", "max_inflight", "expires", "revoked")


def add_keys_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `keys` command and its `create`, `revoke` and `list` subcommands to `subparsers`."""
    keys = subparsers.add_parser("keys", help="create, revoke and list API keys")
    _add_state_dir(keys)
    sub = keys.add_subparsers(dest="keys_command", metavar="{create,revoke,list}", required=True)

    create = sub.add_parser("create", help="issue a new API key; prints the token on stdout")
    create.add_argument("--tenant", required=True, help="tenant the key acts for")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        choices=ALL_SCOPES,
        help="what the key may do; repeatable: run (requests), worker (register as a worker), ingress (an "
        "ingress's node credential), signals (GET /v1/signals), metrics (GET /metrics where metrics_key = true) "
        f"(default: {SCOPE_RUN})",
    )
    create.add_argument("--region", default="", help="pin requests to this region (default: none)")
    create.add_argument(
        "--ttl", type=_non_negative_int, default=0, metavar="SECONDS", help="lifetime; 0 = never expires"
    )
    create.add_argument("--name", default="", help="a label for humans")
    create.add_argument(
        "--filter",
        default="",
        choices=[p for p in FILTER_POLICIES if p],
        help="content-filter policy for the key's requests (default: none, each model's policy applies; "
        "a model set to block is blocked whatever the key says)",
    )
    create.add_argument(
        "--max-priority",
        type=int,
        default=0,
        metavar="N",
        help="highest request priority the key may ask for, -128..127; lower is always allowed (default: 0)",
    )
    create.add_argument(
        "--max-inflight",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="requests the key may have in progress at once (default: 0, the tenant's limit applies)",
    )
    _add_state_dir(create)

    revoke = sub.add_parser("revoke", help="revoke a key by its id; running servers refuse it within a second")
    revoke.add_argument("kid", help="the key id, e.g. k_0123456789ab")
    _add_state_dir(revoke)

    list_ = sub.add_parser("list", help="show the keys issued (never the tokens)")
    list_.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    _add_state_dir(list_)


def run_keys(args: argparse.Namespace) -> int:
    """Run the `keys` subcommand parsed into `args`.

    Returns:
        The exit status: 0 on success, 1 for an unknown kid, a bad argument or a corrupt store.

    Raises:
        OSError: the state directory cannot be read or written.
    """
    state_dir = Path(getattr(args, "keys_state_dir", None) or args.state_dir)
    store = KeyStore(state_dir)
    try:
        if args.keys_command == "create":
            return _create(store, args)
        if args.keys_command == "revoke":
            return _revoke(store, args.kid)
        return _list(store, as_json=args.json)
    except ValueError as exc:
        print(f"casola keys: {exc}", file=sys.stderr)
        return 1


def _create(store: KeyStore, args: argparse.Namespace) -> int:
    scopes: Sequence[str] = args.scopes or [SCOPE_RUN]
    claims, token = store.create(
        args.tenant,
        scopes,
        region=args.region,
        ttl_s=args.ttl,
        name=args.name,
        filter=args.filter,
        max_priority=args.max_priority,
        max_inflight=args.max_inflight,
    )
    print(token)
    pin = f", region {claims.region}" if claims.region else ""
    pin += f", filter {claims.filter}" if claims.filter else ""
    pin += f", max priority {claims.max_priority}" if claims.max_priority else ""
    pin += f", max in flight {claims.max_inflight}" if claims.max_inflight else ""
    print(
        f"created key {claims.kid} for tenant {claims.tenant} (scopes: {', '.join(claims.scopes)}{pin}; "
        f"expires: {_when(claims.exp)}). The token is shown once; store it now.",
        file=sys.stderr,
    )
    return 0


def _revoke(store: KeyStore, kid: str) -> int:
    try:
        store.revoke(kid)
    except UnknownKeyError as exc:
        print(f"casola keys revoke: {exc}; see `casola keys list`", file=sys.stderr)
        return 1
    print(f"revoked key {kid}; running servers refuse it within about a second")
    return 0


def _list(store: KeyStore, *, as_json: bool) -> int:
    records = store.list()
    if as_json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print(f"no keys in {store.state_dir}", file=sys.stderr)
        return 0
    rows = [_COLUMNS, *(_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _row(record: dict[str, object]) -> tuple[str, ...]:
    scopes = record.get("scopes")
    exp = record.get("exp")
    return (
        str(record.get("kid", "")),
        str(record.get("name") or "-"),
        str(record.get("tenant", "")),
        ",".join(str(s) for s in scopes) if isinstance(scopes, list) else "",
        str(record.get("region") or "-"),
        str(record.get("filter") or "-"),  # absent in records written before keys had one
        str(record.get("max_priority", 0)),
        str(record.get("max_inflight") or "-"),
        _when(exp if isinstance(exp, int) else 0),
        "yes" if record.get("revoked") else "no",
    )


def _when(unix_s: int) -> str:
    if not unix_s:
        return "never"
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS, not None: a subcommand's default would overwrite a value given one level up.
    parser.add_argument(
        "--state-dir",
        dest="keys_state_dir",
        default=argparse.SUPPRESS,
        help="state directory (default: the global --state-dir)",
    )


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
