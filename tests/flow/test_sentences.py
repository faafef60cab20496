"""The sentence splitter as issue 15 states it: each sentence out the moment it is complete, a
minimum length so "Dr." or "3.5" do not split, and a wait the caller bounds (no hidden timer)."""

from __future__ import annotations

from casola.flow.sentences import SentenceSplitter

ANSWER = (
    " It is 18 degrees and sunny in Paris. Dr. Smith says 3.5 hours of sun remain, so enjoy it."
    " Have a lovely afternoon!"
)


def _stream(text: str, splitter: SentenceSplitter, piece: int) -> list[tuple[int, str]]:
    """(how many characters had arrived, sentence) for each sentence given out."""
    out = []
    for i in range(0, len(text), piece):
        out += [(i + piece, s) for s in splitter.feed(text[i : i + piece])]
    if rest := splitter.flush():
        out.append((len(text), rest))
    return out


def test_each_sentence_comes_out_as_soon_as_the_text_after_it_starts() -> None:
    got = _stream(ANSWER, SentenceSplitter(), 1)
    assert [s for _, s in got] == [
        "It is 18 degrees and sunny in Paris.",
        "Dr. Smith says 3.5 hours of sun remain, so enjoy it.",
        "Have a lovely afternoon!",
    ]
    first_end = ANSWER.index("Paris.") + len("Paris.")
    assert got[0][0] == first_end + 1  # the space after the mark: nothing more was waited for


def test_whatever_the_delta_sizes_the_sentences_are_the_same() -> None:
    want = [s for _, s in _stream(ANSWER, SentenceSplitter(), 1)]
    for piece in (2, 3, 7, 50, len(ANSWER)):
        assert [s for _, s in _stream(ANSWER, SentenceSplitter(), piece)] == want


def test_abbreviations_decimals_and_initials_do_not_end_a_sentence() -> None:
    text = "Mr. J. Smith paid $3.50 at example.com, e.g. for tea. Then he left."
    assert [s for _, s in _stream(text, SentenceSplitter(min_chars=1), 1)] == [
        "Mr. J. Smith paid $3.50 at example.com, e.g. for tea.",
        "Then he left.",
    ]


def test_a_sentence_shorter_than_min_chars_joins_the_next() -> None:
    got = [s for _, s in _stream("Hi. How are you today? Fine.", SentenceSplitter(min_chars=12), 1)]
    assert got == ["Hi. How are you today?", "Fine."]


def test_a_mark_at_the_end_is_pending_until_the_caller_stops_waiting() -> None:
    s = SentenceSplitter()
    assert s.feed("The weather in Paris is sunny.") == []
    assert s.ends_pending()  # the next delta may be " It" (a new sentence) or "5" (a decimal)
    assert s.take_pending() == "The weather in Paris is sunny."
    assert not s.ends_pending() and s.take_pending() == ""


def test_a_decimal_that_arrives_after_the_mark_is_not_cut() -> None:
    s = SentenceSplitter()
    assert s.feed("It will be about 3.") == [] and s.ends_pending()
    assert s.feed("5 degrees warmer tomorrow. ") == ["It will be about 3.5 degrees warmer tomorrow."]


def test_a_long_run_without_an_ending_is_cut_at_a_clause_so_speech_can_start() -> None:
    s = SentenceSplitter(min_chars=5, max_chars=40)
    out = s.feed("one two three four five six seven, eight nine ten eleven twelve thirteen")
    assert out and out[0].endswith("seven,") and len(out[0]) <= 40


def test_blank_lines_and_ideographic_marks_end_sentences() -> None:
    s = SentenceSplitter(min_chars=1)
    assert s.feed("A list follows\n\nFirst item here") == ["A list follows"]
    assert s.feed("\u4eca\u65e5\u306f\u6674\u308c\u3002\u660e\u65e5") == [
        "First item here\u4eca\u65e5\u306f\u6674\u308c\u3002"
    ]
