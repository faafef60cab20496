"""Generated files are current: the error module and SPEC table (errors.toml), and the golden vectors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["protocol/generate.py", "protocol/make_vectors.py"])
def test_generated_files_are_current(script: str) -> None:
    result = subprocess.run([sys.executable, script, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
