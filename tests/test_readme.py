"""The README's commands are the ones CI runs, and the code is lint-clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.require import missing, need_module

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return [
        line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("    python3 -m venv")
    ]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    main_job, tests = readme_commands()[:2]
    assert "pytest" in tests and "pytest" not in main_job
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(__import__("sys").executable).parent / "ruff")
    if not Path(ruff).exists():
        missing("ruff", "ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_wire_core_is_mypy_strict_clean() -> None:
    need_module("mypy")
    from mypy import api

    stdout, stderr, status = api.run(["--config-file", str(ROOT / "setup.cfg"), str(ROOT / "casola" / "wire")])
    assert status == 0, stdout[-3000:] + stderr


def test_the_whole_package_type_checks() -> None:
    """casola/wire is held to --strict (setup.cfg); the rest must at least type-check."""
    need_module("mypy")
    from mypy import api

    stdout, stderr, status = api.run(["--config-file", str(ROOT / "setup.cfg"), str(ROOT / "casola")])
    assert status == 0, stdout[-3000:] + stderr
