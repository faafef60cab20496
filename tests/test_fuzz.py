"""Fuzzing in CI: replay the corpus as ordinary tests, then run atheris for a bounded time.

CASOLA_FUZZ_SECONDS (default 20) is the time per harness; 0 skips the atheris run, except where the
run requires it (tests/require.py: CASOLA_TEST_REQUIRE=all in CI, where 0 fails).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.harness import fuzz_connection, fuzz_decoder
from fuzz.make_corpus import seeds
from tests.require import missing, need_module

ROOT = Path(__file__).resolve().parent.parent
SEEDS = seeds()


@pytest.mark.parametrize("data", SEEDS["decoder"], ids=lambda d: d[:12].hex())
def test_replay_decoder(data: bytes) -> None:
    fuzz_decoder(data)


def test_replay_connection() -> None:
    for data in SEEDS["connection"]:
        fuzz_connection(data)


@pytest.mark.fuzz
@pytest.mark.parametrize("harness", ["fuzz_decoder", "fuzz_connection"])
def test_bounded_fuzz_run(harness: str, tmp_path: Path) -> None:
    seconds = int(os.environ.get("CASOLA_FUZZ_SECONDS", "20"))
    if seconds <= 0:
        missing("fuzz-run", "CASOLA_FUZZ_SECONDS=0")
    need_module("atheris")
    subprocess.run([sys.executable, "fuzz/make_corpus.py"], cwd=ROOT, check=True, capture_output=True)
    corpus = ROOT / "fuzz" / "corpus" / harness.removeprefix("fuzz_")
    work = tmp_path / "corpus"  # new inputs go here; the seed corpus stays as built
    work.mkdir()
    cmd = [
        sys.executable, f"fuzz/{harness}.py", str(work), str(corpus),
        f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-timeout=10",
        f"-artifact_prefix={ROOT / 'fuzz' / 'crashes'}/{harness}-",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done" in result.stderr, result.stderr[-2000:]
