"""The switch that turns a missing need into a failure (tests/require.py, tests/conftest.py), and CI
setting it: a run without espeak-ng (or PostgreSQL, atheris, ...) must fail in CI, not pass skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.require import ENV, missing, need_program

ROOT = Path(__file__).resolve().parent.parent
PROBE = "CASOLA_REQUIRE_PROBE"  # set only by the runs below: then the probe tests exist

if os.environ.get(PROBE):

    @pytest.mark.needs("espeak-ng")
    def test_probe_needs_espeak() -> None:
        pass

    def test_probe_plain_skip() -> None:
        pytest.skip("a plain skip, as a file not routed through tests/require.py would do")


def probe(test: str, path: str, require: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "CASOLA_TEST_REQUIRE_PG")}
    env.update({PROBE: "1", "PATH": path})
    if require is not None:
        env[ENV] = require
    argv = [sys.executable, "-m", "pytest", f"tests/test_require.py::{test}", "-q", "-p", "no:cacheprovider"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_ci_requires_everything() -> None:
    """.ci/run exports CASOLA_TEST_REQUIRE=all before it runs the README's test command."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    export = lines.index("export CASOLA_TEST_REQUIRE=${CASOLA_TEST_REQUIRE:-all}")
    assert export < next(i for i, line in enumerate(lines) if "python -m pytest" in line)


def test_missing_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("CASOLA_TEST_REQUIRE_PG", raising=False)
    with pytest.raises(pytest.skip.Exception):
        missing("espeak-ng", "not here")
    for value in ("all", "postgresql,espeak-ng"):
        monkeypatch.setenv(ENV, value)
        with pytest.raises(pytest.fail.Exception, match="espeak-ng is required"):
            missing("espeak-ng", "not here")
    monkeypatch.setenv(ENV, "postgresql")
    with pytest.raises(pytest.skip.Exception):
        missing("espeak-ng", "not here")
    monkeypatch.setenv("CASOLA_TEST_REQUIRE_PG", "1")  # the older switch still requires PostgreSQL
    with pytest.raises(pytest.fail.Exception):
        missing("postgresql", "not reachable")


def test_need_program_finds_it_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool = tmp_path / "casola-test-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert need_program("casola-test-tool") == str(tool)


def test_a_missing_program_fails_a_run_that_requires_it(tmp_path: Path) -> None:
    """PATH without espeak-ng (an empty folder): the marked test skips, and fails under the switch."""
    relaxed = probe("test_probe_needs_espeak", str(tmp_path), None)
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout
    strict = probe("test_probe_needs_espeak", str(tmp_path), "all")
    assert strict.returncode == 1, strict.stdout
    assert "espeak-ng is required here" in strict.stdout and "1 error" in strict.stdout, strict.stdout


def test_any_skip_fails_under_all() -> None:
    """A skip that does not go through tests/require.py is a failure too under `all`, not under a list."""
    strict = probe("test_probe_plain_skip", os.environ.get("PATH", ""), "all")
    assert strict.returncode == 1 and "allows no skip: a plain skip" in strict.stdout, strict.stdout
    listed = probe("test_probe_plain_skip", os.environ.get("PATH", ""), "espeak-ng")
    assert listed.returncode == 0 and "1 skipped" in listed.stdout, listed.stdout
