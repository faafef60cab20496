"""The tiny offline model set, built once for every handler test (`casola models build-tiny`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.tiny import build_tiny_set


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_set(root)
    return root
