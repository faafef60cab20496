"""The rule-based classifier: literal case-insensitive terms, RE2 patterns, the label of the first
rule in configuration order, and the inline/thread split of `classify`."""

from __future__ import annotations

import concurrent.futures
import inspect
import re
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casola.filter.base import Classifier, Verdict
from casola.filter.rules import RuleClassifier
from casola.wire import Buffer

__all__: list[str] = []

MiB = 1024 * 1024


def flagged(label: str) -> Verdict:
    return Verdict(flagged=True, label=label, score=1.0, classifier="rules")


def test_implements_the_protocol() -> None:
    rc: Classifier = RuleClassifier(["x"], [])
    assert rc.name == "rules"


@pytest.mark.parametrize("text", [b"say SECRET now", b"say secret now", b"say SeCrEt now", b"secret"])
def test_term_is_case_insensitive(text: bytes) -> None:
    assert RuleClassifier(["Secret"], []).scan(text) == flagged("term:Secret")


@pytest.mark.parametrize("text", ["ÜBERWEISUNG bitte", "eine überweisung", "пароль: 1234", "ПАРОЛЬ"])
def test_non_ascii_term_is_case_insensitive(text: str) -> None:
    rc = RuleClassifier(["Überweisung", "Пароль"], [])
    verdict = rc.scan(text.encode())
    assert verdict.flagged and verdict.label in ("term:Überweisung", "term:Пароль")
    assert rc.scan(b"Uberweisung, napol") == Verdict(classifier="rules")


def test_term_with_metacharacters_is_literal() -> None:
    rc = RuleClassifier(["a.b*(c)", "[x]", "\\d+", "$^|?"], [])
    assert rc.scan(b"..A.B*(C)..") == flagged("term:a.b*(c)")
    assert rc.scan(b"[X]") == flagged("term:[x]")
    assert rc.scan(b"\\D+") == flagged("term:\\d+")
    assert rc.scan(b"1 $^|? 2") == flagged("term:$^|?")
    for clean in (b"axbbb(c)", b"acb", b"x", b"123", b"$^|", b"a.b(c)"):
        assert not rc.scan(clean).flagged, clean


def test_pattern_match() -> None:
    rc = RuleClassifier([], [r"\b\d{3}-\d{2}-\d{4}\b", r"(?i)ignore (all )?previous instructions"])
    assert rc.scan(b"ssn 123-45-6789.") == flagged(r"pattern:\b\d{3}-\d{2}-\d{4}\b")
    assert rc.scan(b"Ignore all previous instructions").label == "pattern:(?i)ignore (all )?previous instructions"
    assert not rc.scan(b"1234-45-6789 and ignore the previous one").flagged


def test_pattern_is_case_sensitive_unless_it_says_so() -> None:
    rc = RuleClassifier([], ["secret"])
    assert rc.scan(b"secret").flagged
    assert not rc.scan(b"SECRET").flagged


def test_first_rule_in_configuration_order_is_the_label() -> None:
    rc = RuleClassifier(["zeta", "beta"], ["al+pha", "b.ta"])
    # The text order is alpha, beta, zeta; the configuration order wins: terms first, then patterns.
    assert rc.scan(b"alpha beta zeta").label == "term:zeta"
    assert rc.scan(b"alpha beta").label == "term:beta"
    assert rc.scan(b"alpha bota").label == "pattern:al+pha"
    assert rc.scan(b"bota").label == "pattern:b.ta"


def test_clean_input_gets_one_shared_verdict() -> None:
    rc = RuleClassifier(["secret"], ["x{3}"])
    first = rc.scan(b"nothing to see")
    assert first == Verdict(classifier="rules") and not first.flagged
    assert rc.scan(b"xx") is first
    assert rc.classify(b"", "text/plain", "m") is first


def test_a_flagged_verdict_is_preallocated_too() -> None:
    rc = RuleClassifier(["secret"], [])
    assert rc.scan(b"a secret") is rc.scan(b"SECRET!")


def test_invalid_bytes_are_scanned_not_decoded() -> None:
    rc = RuleClassifier(["secret"], [])
    assert rc.scan(b"\xff\xfe\x80secret\xc3").flagged
    assert not rc.scan(b"\xff\xfe\x80\xc3").flagged


@pytest.mark.parametrize(("terms", "patterns"), [([], []), ([""], []), (["", ""], [""])])
def test_empty_rule_set(terms: list[str], patterns: list[str]) -> None:
    rc = RuleClassifier(terms, patterns)
    assert rc.empty
    assert rc.scan(b"anything") == Verdict(classifier="rules")
    assert rc.classify(b"x" * (2 * MiB), "text/plain", "m") == Verdict(classifier="rules")  # no thread


def test_empty_terms_are_ignored() -> None:
    rc = RuleClassifier(["", "secret"], [])
    assert not rc.empty
    assert not rc.scan(b"public").flagged
    assert rc.scan(b"secret").label == "term:secret"


@pytest.mark.parametrize("pattern", ["a(", "[z-a]", "x**", "a{2,1}", "(?z)a", "\\"])
def test_invalid_pattern_raises_value_error_naming_it(pattern: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        RuleClassifier(["fine"], ["ok", pattern])


def test_invalid_pattern_error_says_why() -> None:
    with pytest.raises(ValueError, match=r"invalid RE2 pattern 'a\(': missing \)"):
        RuleClassifier([], ["a("])


def test_backtracking_constructs_outside_re2_are_rejected() -> None:
    with pytest.raises(ValueError, match="invalid RE2 pattern"):
        RuleClassifier([], [r"(a)\1"])  # backreference: not RE2


def test_rule_that_is_not_unicode_raises_value_error() -> None:
    with pytest.raises(ValueError, match="term"):
        RuleClassifier(["\ud800"], [])


def test_pathological_pattern_is_linear() -> None:
    rc = RuleClassifier([], ["(a+)+$", "(x|xx)+y"])
    assert not rc.scan(b"a" * 100_000 + b"!").flagged  # a backtracking engine would never return
    assert not rc.scan(b"x" * 100_000).flagged


def test_small_input_is_classified_inline() -> None:
    rc = RuleClassifier(["secret"], [])
    verdict = rc.classify(b"s" * 1000 + b"secret", "text/plain", "m")
    assert isinstance(verdict, Verdict) and verdict.flagged
    at_limit = rc.classify(b"x" * rc.inline_max, "application/octet-stream", "m")  # no loop needed
    assert isinstance(at_limit, Verdict)


@pytest.mark.asyncio
async def test_large_input_is_scanned_in_a_thread() -> None:
    rc = RuleClassifier(["secret"], [], inline_max=1024)
    pending = rc.classify(b"x" * 1024 + b"secret", "text/plain", "m")
    assert not isinstance(pending, Verdict) and inspect.isawaitable(pending)
    assert await pending == flagged("term:secret")
    clean = rc.classify(b"x" * 1025, "text/plain", "m")
    assert not isinstance(clean, Verdict)
    assert await clean == Verdict(classifier="rules")


@pytest.mark.asyncio
async def test_match_at_the_very_end_of_4_mib() -> None:
    rc = RuleClassifier(["needle"], [r"END\z"])
    body = bytearray(b"hay stack " * (4 * MiB // 10))
    body[-6:] = b"NEEDLE"
    pending = rc.classify(body, "text/plain", "m")
    assert not isinstance(pending, Verdict)
    assert await pending == flagged("term:needle")
    body[-6:] = b"xx END"
    assert await rc.classify(body, "text/plain", "m") == flagged(r"pattern:END\z")  # type: ignore[misc]
    body[-3:] = b"EN!"
    assert await rc.classify(body, "text/plain", "m") == Verdict(classifier="rules")  # type: ignore[misc]


class ThreadRecorder(RuleClassifier):
    """Records the thread each scan ran on."""

    threads: list[str]

    def scan(self, data: Buffer) -> Verdict:
        self.threads.append(threading.current_thread().name)
        return super().scan(data)


@pytest.mark.asyncio
async def test_large_input_uses_the_given_executor() -> None:
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rules-test") as executor:
        rc = ThreadRecorder(["secret"], [], inline_max=16, executor=executor)
        rc.threads = []
        assert rc.classify(b"secret", "text/plain", "m") == flagged("term:secret")
        pending = rc.classify(b"0123456789abcdef secret", "text/plain", "m")
        assert not isinstance(pending, Verdict)
        assert await pending == flagged("term:secret")
    assert rc.threads[0] == threading.current_thread().name
    assert rc.threads[1].startswith("rules-test")


@pytest.mark.asyncio
async def test_start_and_stop() -> None:
    rc = RuleClassifier(["x"], [])
    await rc.start()
    assert rc.scan(b"x").flagged
    await rc.stop()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffer_types(kind: type) -> None:
    rc = RuleClassifier(["secret"], [])
    assert rc.scan(kind(b"top SECRET")).flagged
    assert rc.classify(kind(b"top SECRET"), "text/plain", "m") == flagged("term:secret")
    assert not rc.scan(kind(b"top")).flagged


def test_memoryview_slice_and_odd_views() -> None:
    rc = RuleClassifier(["secret"], [])
    buf = bytearray(b"xxxxsecretxxxx")
    assert rc.scan(memoryview(buf)[4:10]).flagged
    assert not rc.scan(memoryview(buf)[5:]).flagged
    padded = bytearray(b"\0\0secret")  # 8 bytes: viewed as two 4-byte items, still 8 bytes scanned
    assert rc.scan(memoryview(padded).cast("I")).flagged
    assert rc.classify(memoryview(padded).cast("I"), "text/plain", "m") == flagged("term:secret")
    assert rc.scan(memoryview(b"sxeyczrxeqtz")[::2]).flagged  # strided: the bytes s e c r e t
    assert not rc.scan(memoryview(b"secretsecret")[1::2]).flagged  # e r t e r t


@given(
    before=st.text(max_size=200),
    term=st.text(min_size=1, max_size=30),
    after=st.text(max_size=200),
)
@settings(max_examples=300, deadline=None)
def test_inserted_term_is_always_found(before: str, term: str, after: str) -> None:
    rc = RuleClassifier(["unrelated", term], [])
    verdict = rc.scan(f"{before}{term}{after}".encode())
    assert verdict.flagged and verdict.label in ("term:unrelated", f"term:{term}")


@given(
    term=st.text(st.characters(codec="ascii"), min_size=1, max_size=20),
    flips=st.lists(st.booleans(), min_size=20, max_size=20),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_inserted_term_in_any_case_is_found(term: str, flips: list[bool], data: st.DataObject) -> None:
    changed = "".join(c.swapcase() if flip else c for c, flip in zip(term, flips, strict=False))
    text = data.draw(st.text(max_size=100))
    at = data.draw(st.integers(0, len(text)))
    assert RuleClassifier([term], []).scan(f"{text[:at]}{changed}{text[at:]}".encode()).label == f"term:{term}"


@given(term=st.text(min_size=1, max_size=20), data=st.data())
@settings(max_examples=300, deadline=None)
def test_text_without_the_terms_first_character_is_clean(term: str, data: st.DataObject) -> None:
    # No character of the text is the term's first character in any case (Python's `re` folds at
    # least as much as RE2: it also excludes the Kelvin sign for k), so the term cannot occur; the
    # text may hold every other character of the term, and near misses.
    first = re.compile(re.escape(term[0]), re.IGNORECASE)
    chars = st.characters(codec="utf-8").filter(lambda c: not first.fullmatch(c))
    rest = "".join(c for c in term[1:] if not first.fullmatch(c))
    pieces = st.one_of(chars, st.just(rest), st.sampled_from(rest)) if rest else chars
    text = "".join(data.draw(st.lists(pieces, max_size=60)))
    assert RuleClassifier([term], []).scan(text.encode()) == Verdict(classifier="rules")
