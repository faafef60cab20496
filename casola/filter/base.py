"""What every classifier shares: its verdict, the small interface it implements, and the policy
that says what a model's requests get (off, race, block).

A classifier answers either at once (a `Verdict`: cheap work on a small input, no task, no future)
or later (an awaitable that resolves to one: a thread-pool scan of a large input, a request to a
classifier model). The queue node starts it right after dispatch (race) or before (block) and never
awaits it on the request's path.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from typing import Literal, Protocol

import msgspec

from casola.wire import Buffer

__all__ = ["CLEAN", "Classifier", "FilterConfig", "Policy", "Verdict"]


class Policy(enum.StrEnum):
    OFF = "off"  # no classification
    RACE = "race"  # classify while the worker runs; a violation that arrives first aborts
    BLOCK = "block"  # classify first, dispatch only a clean input (adds the classifier's latency)
    HOLD = "hold"  # dispatch at once, racing; the answer leaves only once the input is found clean


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    flagged: bool = False
    label: str = ""  # what matched: a rule's name, a model's category
    score: float = 0.0  # the classifier's confidence, 0..1 (rules: 1.0 when flagged)
    classifier: str = ""  # which classifier said so
    error: str = ""  # set when classification failed (the policy's `on_error` decides what it means)


CLEAN = Verdict()


class Classifier(Protocol):
    """A content classifier. `classify` must not block the event loop for long: a large input is
    handed to a thread (or to another process) and an awaitable returned instead."""

    name: str

    def classify(self, data: Buffer, content_type: str, model: str) -> Verdict | Awaitable[Verdict]:
        """The verdict on `data` (the whole request body) sent to `model`, now or later.

        An awaitable may raise; the caller turns that into `Verdict(error=...)`."""
        ...

    async def start(self) -> None:
        """Acquire what the classifier needs (connections); called once before the first classify."""
        ...

    async def stop(self) -> None: ...


class FilterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[queue.filter]`: which classifiers run and what each model's requests get."""

    policy: Policy = Policy.RACE  # every model's default
    models: dict[str, Policy] = {}  # per model; "block" there also overrides a key's own policy
    classifiers: list[Literal["rules", "model"]] = msgspec.field(default_factory=lambda: ["rules"])  # any one flags
    terms: list[str] = []  # rules: literal terms, matched case-insensitively
    patterns: list[str] = []  # rules: RE2 regular expressions (linear time, no backtracking)
    classify_model: str = "classify"  # model: the worker model that classifies
    timeout_ms: int = 2000  # a classification that takes longer counts as an error
    on_error: Literal["allow", "block"] = "allow"  # what a failed classification means
    max_input: int = 16 * 1024 * 1024  # larger inputs are not classified (block: refused with 413)
    audit_clean: bool = False  # also store an audit record for clean verdicts (violations always)
