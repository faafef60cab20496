"""The built-in rule-based classifier: configured literal terms and RE2 patterns, one pass per input.

Why RE2: the patterns come from configuration, and a backtracking engine (`re`) can take exponential
time on a pattern such as `(a+)+$`, which would turn one request body into a denial of service.
RE2 runs in time linear in the input whatever the pattern. All rules are compiled into a single
`re2.Set`, so one scan of the input answers every rule (the multi-pattern DFA walks the bytes once,
rather than once per rule). Inputs are scanned as bytes, never decoded: terms and patterns are UTF-8,
and RE2 matches UTF-8 text, case folding included, directly on the encoded bytes.

Why the inline/thread split: a warm scan costs 2-8 ns per byte (bench/filter_rules.py: a 1 KiB input
3-7 us, 64 KiB 0.1-0.4 ms, from 10 terms to 1,000 terms + 5 patterns). Up to `inline_max` (64 KiB)
the scan runs inline and `classify` returns the verdict itself, cheaper than any hand-off to a
thread. A larger input is scanned in a thread pool so that the event loop keeps serving other
requests; `re2.Set.Match` releases the GIL while it scans, so the scan runs beside the loop rather
than stalling it (see `classify`). RE2's DFA builds its states lazily, so the first scans after
start-up, and those after its cache fills and resets, cost far more: with 1,000 terms + 5 patterns,
a first 64 KiB scan took 20-45 ms, a first 1 KiB scan 1-6 ms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Sequence
from typing import Final

import re2  # type: ignore[import-untyped]

from casola.filter.base import Verdict
from casola.wire import Buffer

__all__ = ["INLINE_MAX", "MAX_MEM", "NAME", "RuleClassifier"]

NAME: Final = "rules"
INLINE_MAX: Final = 64 * 1024  # larger inputs go to a thread: a warm 64 KiB scan is 0.1-0.4 ms
# RE2's memory budget for the compiled set and its DFA cache (RE2's default is 8 MiB). A set of a
# few tens of thousands of terms does not compile at 8 MiB; 64 MiB fits 50,000. The budget is an
# upper bound that the DFA cache grows into lazily, not an allocation made up front.
MAX_MEM: Final = 64 * 1024 * 1024

_CLEAN: Final = Verdict(classifier=NAME)  # the one verdict every clean input gets (frozen: shared)


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_MEM
    options.log_errors = False  # errors are raised as ValueError, not logged to stderr by absl
    return options


def _encode(rule: str, kind: str) -> bytes:
    try:
        return rule.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise ValueError(f"{kind} {rule!r} is not valid Unicode: {exc}") from exc


def _pattern_error(pattern: bytes) -> str:
    """RE2's reason for rejecting `pattern` (the Set API only says that it failed)."""
    try:
        re2.compile(pattern, options=_options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    return "rejected by RE2"


# Text-like bytes of every printable ASCII character, to visit the states ordinary inputs reach.
_WARM_UP: Final = (bytes(range(32, 127)) + b' the quick brown fox 0123456789 {"k": [1, 2.5]}\n') * 512


class RuleClassifier:
    """Flags an input in which any configured term or pattern occurs.

    Terms are literal and case-insensitive (Unicode case folding, not only ASCII); empty terms are
    ignored. Patterns are RE2 syntax as given (case-sensitive unless they say `(?i)`); empty
    patterns, which would match every input, are ignored too. The verdict names the first matching
    rule in configuration order, terms before patterns: `term:<term>` or `pattern:<pattern>`.

    Args:
        terms: literal terms.
        patterns: RE2 regular expressions.
        inline_max: inputs up to this many bytes are scanned inline by `classify`.
        executor: where `classify` scans larger inputs; None is the event loop's default executor.

    Raises:
        ValueError: a pattern is not valid RE2 syntax (the message names it), a rule is not
            encodable as UTF-8, or the rule set does not fit RE2's memory budget (`MAX_MEM`).
    """

    name = NAME

    def __init__(
        self,
        terms: Sequence[str],
        patterns: Sequence[str],
        *,
        inline_max: int = INLINE_MAX,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.inline_max = inline_max
        self.executor = executor
        # The verdict of each rule, indexed by its number in the set (= configuration order), so a
        # flagged input allocates nothing either.
        self._verdicts: list[Verdict] = []
        self._set: re2.Set | None = None
        rules = [("term", t, b"(?i)" + re2.escape(_encode(t, "term"))) for t in terms if t]
        rules += [("pattern", p, _encode(p, "pattern")) for p in patterns if p]
        if not rules:
            return
        rule_set = re2.Set.SearchSet(_options())
        for kind, rule, regex in rules:
            try:
                index = rule_set.Add(regex)
            except re2.error:
                raise ValueError(f"invalid RE2 {kind} {rule!r}: {_pattern_error(regex)}") from None
            assert index == len(self._verdicts)  # RE2 numbers the rules 0, 1, 2, ... as added
            self._verdicts.append(Verdict(flagged=True, label=f"{kind}:{rule}", score=1.0, classifier=NAME))
        try:
            rule_set.Compile()
        except re2.error as exc:
            raise ValueError(
                f"{len(rules)} rules do not fit RE2's memory budget of {MAX_MEM >> 20} MiB: {exc}"
            ) from None
        self._set = rule_set

    @property
    def empty(self) -> bool:
        """No terms and no patterns: every input is clean, and `classify` does no work."""
        return self._set is None

    def classify(self, data: Buffer, content_type: str, model: str) -> Verdict | Awaitable[Verdict]:
        """The verdict on `data`: at once up to `inline_max` bytes, else from a thread.

        The rules apply to any content type and model; both are accepted for the protocol.
        The larger input is scanned in `executor`. `re2.Set.Match` releases the GIL for the scan:
        google-re2's `_re2.cc` holds a pybind11 `gil_scoped_release` around `RE2::Set::Match`, and
        checked on 2 vCPUs: while a thread scans 1-4 MiB inputs, the main thread keeps running
        Python at 40-90% of its pace alone (bench/filter_rules.py; a GIL-holding scan gives ~0),
        and two threads scan two 4 MiB inputs in ~0.65x the sequential time. So the event loop is
        not stalled by it. The caller must not mutate `data` until the awaitable resolves.

        Returns:
            A `Verdict`, or an awaitable of one for an input larger than `inline_max`.

        Raises:
            RuntimeError: a large input, and no running event loop to hand the scan from.
        """
        if self._set is None:
            return _CLEAN
        size = data.nbytes if type(data) is memoryview else len(data)
        if size <= self.inline_max:
            return self.scan(data)
        return asyncio.get_running_loop().run_in_executor(self.executor, self.scan, data)

    def scan(self, data: Buffer) -> Verdict:
        """Scan `data` synchronously, in one pass over its bytes, and return the verdict.

        Raises nothing for any byte content (invalid UTF-8 included: it just matches no rule).
        """
        if self._set is None:
            return _CLEAN
        if type(data) is memoryview and not (data.c_contiguous and data.itemsize == 1):
            # google-re2 reads len(view) bytes from the start of the buffer as if it were packed
            # bytes, so a strided or multi-byte-item view would be scanned wrong (a silent miss).
            data = data.cast("B") if data.c_contiguous else data.tobytes()
        matches: list[int] | None = self._set.Match(data)  # indices in no particular order, or None
        if not matches:
            return _CLEAN
        return self._verdicts[min(matches)]

    async def start(self) -> None:
        """Warm the automaton up in a thread: RE2 builds its DFA states on demand, so the first scans
        of a large rule set cost tens of ms (measured: a first 64 KiB scan with 1,000 terms, 20-45 ms,
        2-7 ms after this) and would otherwise run inline on the first requests."""
        if not self.empty:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.scan, _WARM_UP)

    async def stop(self) -> None:
        """Nothing to release (the executor is the caller's)."""
