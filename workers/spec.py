"""What one served model is: its name, handler kind, directory and device settings.

A model directory holds the CTranslate2 files (model.bin, config.json, vocabulary, tokenizer.json,
optional chat_template.jinja) and `casola.json`, the manifest that names the handler:

    {"kind": "whisper" | "llm" | "tts" | "classify" | "tools" | "listen",
     "description": "...", "source": "where the weights came from",
     "files": {"model.bin": "<sha256>", ...},      # optional; `casola models list --verify` checks them
     "options": {...}}                              # per kind, see each handler's module

The config's `[models.<name>]` table may override the kind, path, device, compute type, threads and
options; otherwise everything comes from `<models_dir>/<name>/casola.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "MANIFEST", "ModelSpec", "SpecError", "read_manifest"]

MANIFEST = "casola.json"
KINDS = ("whisper", "llm", "tts", "classify", "tools", "listen")


class SpecError(ValueError):
    """A model cannot be resolved: no directory, no manifest, or an unknown kind."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    path: Path | None  # None without a directory (engines without model files may have none: tts, tools)
    device: str = "auto"  # auto | cpu | cuda
    compute_type: str = "auto"  # auto, or any CTranslate2 compute type (int8, float16, int8_float16...)
    threads: int = 0  # intra_threads for CTranslate2 on CPU (0: its default)
    options: dict[str, Any] = field(default_factory=dict)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a model directory.

    Raises:
        SpecError: missing or unreadable manifest, or an unknown kind.
    """
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{directory}: no {MANIFEST} (run `casola models build-tiny` or `prepare-demo`)") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise SpecError(f'{path}: "kind" must be one of {", ".join(KINDS)}')
    return data
