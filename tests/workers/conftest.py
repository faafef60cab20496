"""The tiny offline model set, built once for every handler test (`casola models build-tiny`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.require import need_module
from workers.tiny import build_tiny_set


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("ctranslate2", "tokenizers"):  # what the set is built with (tests/require.py)
        need_module(module, "model-sets")
    root = tmp_path_factory.mktemp("models")
    build_tiny_set(root)
    return root
