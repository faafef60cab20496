"""From a model name to a running handler: resolve its spec (config overrides over the directory's
manifest) and build the handler for its kind. Handler modules import CTranslate2 and friends, so
they load only when a worker serves such a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.spec import KINDS, MANIFEST, ModelSpec, SpecError, read_manifest

if TYPE_CHECKING:
    from casola.config import ModelConfig
    from casola.worker import Model

__all__ = ["HANDLERS", "build", "describe", "resolve"]

# kind -> "module:class"; each class takes a ModelSpec.
HANDLERS = {
    "whisper": "workers.asr:WhisperModel",
    "llm": "workers.llm:LLMModel",
    "tts": "workers.tts:TTSModel",
    "classify": "workers.classify:ClassifyModel",
    "tools": "workers.tools:ToolsModel",
    "listen": "workers.listen:ListenModel",
}


def resolve(name: str, models_dir: str | Path, overrides: Mapping[str, ModelConfig] | None = None) -> ModelSpec:
    """The spec of model `name`: `[models.<name>]` over `<models_dir>/<name>/casola.json`.

    Raises:
        SpecError: no directory/manifest and no kind in the config, or an unknown kind.
    """
    o = (overrides or {}).get(name)
    path = Path(o.path) if o is not None and o.path else Path(models_dir) / name
    manifest: dict[str, Any] = {}
    if (path / MANIFEST).exists() or o is None or not o.kind:
        manifest = read_manifest(path)
    kind = (o.kind if o is not None and o.kind else "") or manifest.get("kind", "")
    if kind not in KINDS:
        raise SpecError(f"model {name!r}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    options = {**manifest.get("options", {}), **(o.options if o is not None else {})}
    return ModelSpec(
        name=name,
        kind=kind,
        path=path if path.exists() else None,
        device=o.device if o is not None else "auto",
        compute_type=o.compute_type if o is not None else "auto",
        threads=o.threads if o is not None else 0,
        options=options,
    )


def build(spec: ModelSpec) -> Model:
    """The handler for `spec`, its model loaded (once per process)."""
    module, _, cls = HANDLERS[spec.kind].partition(":")
    handler: Model = getattr(importlib.import_module(module), cls)(spec)
    return handler


def describe(spec: ModelSpec) -> dict[str, Any]:
    """What `casola models list` shows of one model, without loading it."""
    size = sum(f.stat().st_size for f in spec.path.iterdir() if f.is_file()) if spec.path else 0
    return {
        "name": spec.name,
        "kind": spec.kind,
        "path": str(spec.path) if spec.path else "",
        "device": spec.device,
        "compute_type": spec.compute_type,
        "bytes": size,
    }
