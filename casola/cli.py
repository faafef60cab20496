"""The `casola` command: `up`, `ingress`, `queue`, `worker`, `keys`, `certs`, `models`, `workflows`.

`casola up` is what a new user runs first: the ingress and a queue node in this process (joined by
the in-memory link), local worker processes from the config (with no config: one `echo` worker), a
development API key in `<state-dir>/dev-api-key`; with `--tls`, HTTPS with development certificates
from `<state-dir>/certs` (`casola certs dev` makes them alone). Each role also runs alone, which is how
a multi-region deployment is laid out.

What stops a role is said in one line, `casola <role>: <why>`: exit status 2 for a configuration or
flag that is wrong, 1 for what is in its way (an address in use, a state directory it cannot
write: casola.startup). Logging (`--log-level`, `--log-format`, `--access-log`) is casola.logs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from casola import __version__
from casola.auth.cli import add_keys_parser, run_keys
from casola.config import WORKER_POOLS, Config, ConfigError, load_config
from casola.flow.cli import add_workflows_parser, run_workflows
from casola.logs import LOG_FORMATS, LOG_LEVELS, setup_logging
from casola.models_cli import add_models_parser, run_models

__all__ = ["main"]

ROLES = ("up", "ingress", "queue", "worker")
# glibc trims and regrows the heap around uvloop's large reads (PERF-ANCHORS finding 1); a 128 MiB
# top pad keeps large payloads off brk/munmap churn. Read at process start, so we re-exec once.
MALLOC_ENV = {"MALLOC_TOP_PAD_": str(128 * 1024 * 1024)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="casola", description="low-latency inference router")
    p.add_argument("--version", action="version", version=f"casola {__version__}", help="print the version and exit")
    p.add_argument("--state-dir", default=None, help="keys and runtime state (default: ./.casola or the config's)")
    roles = "{up,ingress,queue,worker,keys,certs,models,workflows}"
    sub = p.add_subparsers(dest="command", required=True, metavar=roles)

    up = sub.add_parser("up", help="ingress + queue node in one process, plus local workers")
    _common(up)
    up.add_argument("--http", metavar="HOST:PORT", help="HTTP listener (default 127.0.0.1:8000)")
    up.add_argument("--frames", metavar="HOST:PORT", help='raw-frame listener (default 127.0.0.1:7700; "" = off)')
    up.add_argument("--queue", metavar="HOST:PORT", help="queue node listener (default 127.0.0.1:7710)")
    up.add_argument("--trace", action="store_true", help="Server-Timing on every response")
    up.add_argument("--tls", action="store_true", help="HTTPS with development certificates in <state-dir>/certs")
    up.add_argument("--models-dir", help="model directories (default: the config's models_dir, ./models)")
    _access_log(up)

    ing = sub.add_parser("ingress", help="the edge ingress alone")
    _common(ing)
    ing.add_argument("--http", metavar="HOST:PORT", help="HTTP listener (default: the config's, 127.0.0.1:8000)")
    ing.add_argument(
        "--frames", metavar="HOST:PORT", help='raw-frame listener (default: the config\'s, 127.0.0.1:7700; "" = off)'
    )
    ing.add_argument(
        "--queue-node",
        action="append",
        default=[],
        metavar="HOST:PORT[@REGION]",
        help="queue node to dial, repeatable (default: the config's queue_nodes, else [queue] listen)",
    )
    ing.add_argument("--trace", action="store_true", help="Server-Timing on every response")
    _access_log(ing)

    q = sub.add_parser("queue", help="a queue node alone")
    _common(q)
    q.add_argument("--listen", metavar="HOST:PORT", help="for ingresses and workers (default 127.0.0.1:7710)")
    q.add_argument("--region", help="the region this node serves; ingresses route by it (default: local)")
    q.add_argument("--node-id", help="this node's name; leases it holds carry it (default queue-1)")
    q.add_argument(
        "--store", help="async job store URL: sqlite:///path.db or postgresql://... (default <state-dir>/jobs.db)"
    )
    q.add_argument("--models", help="comma-separated models known before a worker registers")
    q.add_argument("--metrics", metavar="HOST:PORT", help="serve GET /metrics there (default: [queue] metrics, off)")

    w = sub.add_parser("worker", help="a worker process")
    _common(w)
    w.add_argument("--queue", action="append", default=[], help="queue node host:port (repeatable)")
    w.add_argument("--models", help="comma-separated model names (default: echo)")
    w.add_argument("--capacity", type=int, help="requests run at once")
    w.add_argument(
        "--pool", choices=WORKER_POOLS, help="capacity pool: sync, async or shared (both, sync first; the default)"
    )
    w.add_argument("--node-id", help="this worker's name in the queue node's registry (default: worker-<pid>)")
    w.add_argument("--threads", type=int, help="thread pool for blocking handlers")
    w.add_argument("--models-dir", help="model directories (default: the config's models_dir, ./models)")
    w.add_argument("--credential-file", help="worker key file (default: <state-dir>/worker-key)")
    w.add_argument("--metrics", metavar="HOST:PORT", help="serve GET /metrics there (default: off)")

    add_keys_parser(sub)
    _certs_parser(sub)
    add_models_parser(sub)
    add_workflows_parser(sub)
    return p


def _certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser("certs", help="TLS certificates for the ingress")
    csub = certs.add_subparsers(dest="certs_command", metavar="{dev}", required=True)
    dev = csub.add_parser("dev", help="a local CA and a server certificate it signs, for HTTPS in development")
    dev.add_argument("--out", help="directory for the files (default: <state-dir>/certs)")
    dev.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="NAME",
        help="DNS name or IP address the certificate is for; repeatable (default: localhost 127.0.0.1 ::1)",
    )
    dev.add_argument("--force", action="store_true", help="issue a new CA and certificate even if the old are fine")
    dev.add_argument("--state-dir", default=argparse.SUPPRESS, help="as the global --state-dir")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file (see casola/config.py)")
    p.add_argument("--state-dir", default=argparse.SUPPRESS, help="as the global --state-dir")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="overrides the config's log_level (default info)")
    p.add_argument(
        "--log-format", choices=LOG_FORMATS, help="text, or json: one object a line with the request id (default text)"
    )


def _access_log(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--access-log", action="store_true", help="one log line per request (logger casola.access; default off)"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        args.state_dir = args.state_dir or ".casola"
        return run_keys(args)
    if args.command == "models":
        return run_models(args)
    if args.command == "workflows":
        return run_workflows(args)
    if args.command == "certs":
        return _run_certs(Path(args.out) if args.out else Path(args.state_dir or ".casola") / "certs", args)
    if argv is None and not os.environ.get("MALLOC_TOP_PAD_") and not os.environ.get("CASOLA_NO_MALLOC_TUNE"):
        os.execve(sys.executable, [sys.executable, "-m", "casola", *sys.argv[1:]], {**os.environ, **MALLOC_ENV})
    try:
        config = apply_overrides(args, load_config(args.config))
    except ConfigError as exc:
        print(f"casola {args.command}: {exc}", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir or config.state_dir)
    setup_logging(config.log_level, config.log_format, config.access_log)
    from casola import roles  # late: keeps `casola keys` light

    try:
        return roles.run(args, config, state_dir)
    except ConfigError as exc:  # what a role checks before it starts (`casola up`: the workers' models)
        print(f"casola {args.command}: {args.config + ': ' if args.config else ''}{exc}", file=sys.stderr)
        return 2
    except roles.StartupError as exc:  # an address in use, an unwritable state dir, a store it cannot open
        print(f"casola {args.command}: {exc}", file=sys.stderr)
        return 1


def _run_certs(out: Path, args: argparse.Namespace) -> int:
    """`casola certs dev`: make or reuse the files, print where they are and how to use them."""
    from casola.certs import DEFAULT_HOSTS, make_dev_certs  # late: keeps the other commands light

    hosts: Sequence[str] = args.hosts or DEFAULT_HOSTS
    try:
        paths = make_dev_certs(out, hosts, force=args.force)
    except (ValueError, OSError) as exc:
        print(f"casola certs dev: {exc}", file=sys.stderr)
        return 1
    ca = paths.ca.resolve()
    host = f"[{hosts[0]}]" if ":" in hosts[0] else hosts[0]  # an IPv6 address goes in brackets in a URL
    print(
        f"development certificates for {', '.join(hosts)} in {out}:\n"
        f"  CA certificate (clients trust it)  {ca}\n"
        f"  CA key (keep private)              {paths.ca_key.resolve()}\n"
        f"  server certificate chain           {paths.cert.resolve()}\n"
        f"  server key                         {paths.key.resolve()}\n"
        f"serve HTTPS with them: in the config\n"
        f"  [ingress]\n"
        f'  tls_cert = "{paths.cert.resolve()}"\n'
        f'  tls_key = "{paths.key.resolve()}"\n'
        f"  (`casola up --tls` makes and uses <state-dir>/certs by itself)\n"
        f"trust them:\n"
        f"  Python clients (ssl, httpx, fal-client): export SSL_CERT_FILE={ca}  (replaces the default CA list)\n"
        f"  requests: export REQUESTS_CA_BUNDLE={ca}\n"
        f"  curl --cacert {ca} https://{host}:8000/healthz"
    )
    return 0


def apply_overrides(args: argparse.Namespace, config: Config) -> Config:
    """Command-line flags win over the config file.

    Raises:
        ConfigError: a flag's value is out of range (`queue --metrics` not host:port).
    """
    try:
        return _apply_overrides(args, config)
    except ValueError as exc:  # a section's __post_init__ check, run again by structs.replace
        raise ConfigError(str(exc)) from exc


def _apply_overrides(args: argparse.Namespace, config: Config) -> Config:
    import msgspec

    ing, q = config.ingress, config.queue
    if getattr(args, "log_level", None):
        config = msgspec.structs.replace(config, log_level=args.log_level)
    if getattr(args, "log_format", None):
        config = msgspec.structs.replace(config, log_format=args.log_format)
    if getattr(args, "access_log", False):
        config = msgspec.structs.replace(config, access_log=True)
    if getattr(args, "http", None):
        ing = msgspec.structs.replace(ing, http=args.http)
    if getattr(args, "frames", None) is not None and args.command in ("up", "ingress"):
        ing = msgspec.structs.replace(ing, frames=args.frames)
    if getattr(args, "trace", False):
        ing = msgspec.structs.replace(ing, trace=True)
    if args.command == "up" and args.queue:
        q = msgspec.structs.replace(q, listen=args.queue)
    if getattr(args, "listen", None):
        q = msgspec.structs.replace(q, listen=args.listen)
    if getattr(args, "region", None):
        q = msgspec.structs.replace(q, region=args.region)
    if getattr(args, "models_dir", None):
        config = msgspec.structs.replace(config, models_dir=args.models_dir)
    if args.command == "queue":
        if args.node_id:
            q = msgspec.structs.replace(q, node_id=args.node_id)
        if args.store:
            q = msgspec.structs.replace(q, jobs=msgspec.structs.replace(q.jobs, store=args.store))
        if args.models:
            q = msgspec.structs.replace(q, models=args.models.split(","))
        if args.metrics:
            q = msgspec.structs.replace(q, metrics=args.metrics)
    return msgspec.structs.replace(config, ingress=ing, queue=q)
