"""Where a model runs: `auto` picks CUDA when CTranslate2 sees a GPU, else the CPU, with a compute
type fit for the device. Models load once per process (`load_once`), whatever number of handlers
or requests use them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from workers.spec import ModelSpec, SpecError

__all__ = ["load_model", "load_once", "pick_device"]

T = TypeVar("T")

# Preferred compute types, best first: int8 weights with float16 activations on a GPU, int8 on a CPU.
_PREFERRED = {
    "cuda": ("int8_float16", "float16", "int8", "float32"),
    "cpu": ("int8", "int8_float32", "float32"),
}


def pick_device(device: str = "auto", compute_type: str = "auto") -> tuple[str, str]:
    """(device, compute_type) to load a model with.

    Raises:
        ValueError: an unknown device, CUDA asked for where there is none, or an unsupported type.
    """
    import ctranslate2

    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device not in _PREFERRED:
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        raise ValueError("device cuda asked for, but CTranslate2 sees no CUDA device")
    supported = ctranslate2.get_supported_compute_types(device)
    if compute_type in ("auto", "default", ""):
        compute_type = next(t for t in _PREFERRED[device] if t in supported)
    elif compute_type not in supported:
        raise ValueError(f"compute type {compute_type!r} is not supported on {device} ({sorted(supported)})")
    return device, compute_type


_loaded: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()


def load_once(key: tuple[Any, ...], factory: Callable[[], T]) -> T:
    """The object `factory` makes, made once per process for `key` (model path, device, type...)."""
    with _lock:
        if key not in _loaded:
            _loaded[key] = factory()
        return _loaded[key]  # type: ignore[no-any-return]


def load_model(spec: ModelSpec, factory: Callable[[str, str, str, int], T]) -> tuple[str, str, T]:
    """(device, compute type, `factory(path, device, compute_type, threads)`) for a model directory,
    the factory run once per process for the same directory, device, type and threads.

    Raises:
        SpecError: the spec names no model directory.
        ValueError: the device or compute type cannot be used.
    """
    if spec.path is None:
        raise SpecError(f"model {spec.name!r}: a {spec.kind} model needs a directory")
    device, compute_type = pick_device(spec.device, spec.compute_type)
    path = str(spec.path)
    made = load_once(
        (spec.kind, path, device, compute_type, spec.threads), lambda: factory(path, device, compute_type, spec.threads)
    )
    return device, compute_type, made
