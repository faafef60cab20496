"""Suite-wide hooks: `@pytest.mark.needs(...)` and the CASOLA_TEST_REQUIRE switch (tests/require.py).

- A test (or module, through `pytestmark`) marked `needs("espeak-ng")` runs only where that is
  present: it skips when it is missing, and fails instead when the run requires it. Programs are
  looked up on PATH, other needs by importing the module of that name.
- Under CASOLA_TEST_REQUIRE=all no test may skip for any reason: a skip from anywhere (a plain
  `pytest.skip`, `importorskip`, a `skipif` mark, a module that skips at import) becomes a failure
  that names the reason. xfail is not a skip and is left alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator

import pytest

from tests.require import ENV, missing, need_module, requires_all

PROGRAMS = frozenset({"espeak-ng"})  # needs that are programs on PATH; any other need is a module


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*names): the test needs these programs or modules; see tests/require.py")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        for need in mark.args:
            if need in PROGRAMS:
                if shutil.which(need) is None:
                    missing(need, f"{need} is not on PATH")
            else:
                need_module(need)


def _as_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped, but {ENV}=all allows no skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and requires_all():
        _as_failure(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if report.skipped and requires_all():
        _as_failure(report)
    return report
