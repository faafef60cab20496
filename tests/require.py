"""What the tests need from outside the virtualenv, and one switch that makes its absence a failure.

A test that needs something missing (PostgreSQL, the espeak-ng program, atheris, the packages a
model set is built from, uvloop, ...) skips with the reason, on a developer's machine. In CI it must
fail instead: a run that skipped what it could not do would pass without having tested it.

    CASOLA_TEST_REQUIRE=all                    every need is required; any skip at all fails (.ci/run)
    CASOLA_TEST_REQUIRE=postgresql,espeak-ng   only those (names as below); others still skip
    CASOLA_TEST_REQUIRE_PG=1                   the older switch: the same as naming postgresql

Tests say what they need through this module: `pytest.mark.needs("espeak-ng")` on a test or module
(tests/conftest.py acts on the mark), `need_program("espeak-ng")`, `need_module("atheris")`, or
`missing(need, reason)` for anything else. tests/conftest.py also turns every other skip into a
failure under `all`, so a plain `pytest.skip` somewhere cannot hide a missing need either.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest

__all__ = ["ENV", "missing", "need_module", "need_program", "required", "requires_all"]

ENV = "CASOLA_TEST_REQUIRE"


def _names() -> set[str]:
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    if os.environ.get("CASOLA_TEST_REQUIRE_PG") not in (None, "", "0"):
        names.add("postgresql")
    return names


def requires_all() -> bool:
    """Whether nothing may skip in this run (CASOLA_TEST_REQUIRE=all)."""
    return "all" in _names()


def required(need: str) -> bool:
    """Whether `need` must be present in this run."""
    names = _names()
    return "all" in names or need in names


def missing(need: str, reason: str) -> NoReturn:
    """`need` is not there: skip with `reason`, or fail when this run requires it.

    Raises:
        pytest.fail.Exception: the run requires `need`.
        pytest.skip.Exception: otherwise (also valid at module level).
    """
    if required(need):
        pytest.fail(f"{need} is required here ({ENV}={os.environ.get(ENV, '')!r}) but missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need_program(name: str) -> str:
    """The path of program `name` on PATH; skips or fails (see `missing`) when there is none."""
    path = shutil.which(name)
    if path is None:
        missing(name, f"{name} is not on PATH")
    return path


def need_module(name: str, need: str | None = None) -> ModuleType:
    """Module `name`, imported; skips or fails as `need` (default: the module's name) when it
    cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(need or name, f"cannot import {name} ({exc})")
