"""`casola workflows list`: the workflows a config declares, each with its steps (or `--json`).

A config with a bad declaration is refused as `casola up` would refuse it, naming the step."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_workflows_parser", "run_workflows"]


def add_workflows_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("workflows", help="list the workflows a config declares")
    wsub = w.add_subparsers(dest="workflows_command", metavar="{list}", required=True)
    ls = wsub.add_parser("list", help="each workflow and its steps")
    ls.add_argument("--config", help="TOML configuration file")
    ls.add_argument("--json", action="store_true", help="one JSON object per workflow")


def run_workflows(args: argparse.Namespace) -> int:
    from casola.config import ConfigError, load_config
    from casola.flow.spec import describe

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"casola workflows: {exc}", file=sys.stderr)
        return 2
    for name, wf in config.workflows.items():
        row = describe(name, wf)
        if args.json:
            print(json.dumps(row))
            continue
        steps = " -> ".join(_step(s) for s in row["steps"])
        deadline = f"{row['deadline_ms']} ms" if row["deadline_ms"] else "none"
        print(f"{name:16} deadline {deadline:9} {steps}")
    if not config.workflows and not args.json:
        print("no workflows declared ([workflows.<name>] in the config: docs/workflows.md)")
    return 0


def _step(s: dict[str, object]) -> str:
    target = s.get("model") or s.get("tool") or ""
    tools = s.get("tools")
    more = f" tools={','.join(tools)}" if isinstance(tools, list) and tools else ""
    return f"{s['name']}({s['kind']}{':' + str(target) if target else ''}{more})"
