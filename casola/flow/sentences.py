"""LLM text deltas to whole sentences, each given out the moment it is complete (no clock here).

A sentence ends at `.`, `!`, `?` or `…` (closing quotes and brackets kept with it) followed by
whitespace, at a blank line, or at an ideographic full stop, exclamation or question mark (no
space follows those). What is not an ending:

- a mark followed by anything but whitespace (`3.5`, `e.g.x`, `example.com`);
- a mark ending a text shorter than `min_chars` ("Dr.", "No.", "Hi."): it joins the next one;
- a mark after a known abbreviation (`Dr.`, `Mr.`, `e.g.`, `vs.`, single initials such as `J.`).

A mark at the very end of the text so far may or may not end a sentence (the next delta may be "5"
of "3.5"): `ends_pending()` says so and the caller decides how long to wait for more, a bounded
wait of its own (casola.flow.run: `max_wait_ms`, and the end of the stream ends it at once). A run
of `max_chars` without an ending is cut at its last clause mark, else its last space, so the next
step never starves.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["SentenceSplitter"]

_ENDS: Final = ".!?…"
_WIDE_ENDS: Final = "\u3002\uff01\uff1f"  # ideographic full stop, fullwidth ! and ?
_CLOSERS: Final = "\"')]}\u00bb\u201d\u2019"  # quotes and brackets that close after a mark
_ABBREVIATIONS: Final = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf no fig approx dept est inc ltd co corp jan feb mar apr jun"
    " jul aug sep sept oct nov dec mon tue wed thu fri sat sun".split()
)
_CLAUSE: Final = re.compile("[,;:\u2014\u2013-]\\s")  # a clause mark (dashes too) and a space


class SentenceSplitter:
    __slots__ = ("_buf", "max_chars", "min_chars")

    def __init__(self, min_chars: int = 12, max_chars: int = 300) -> None:
        self.min_chars, self.max_chars = min_chars, max_chars
        self._buf = ""

    def feed(self, text: str) -> list[str]:
        """The sentences that `text` completes (often none, rarely more than one)."""
        self._buf += text
        out: list[str] = []
        while (cut := self._ending()) is not None:
            out.append(self._take(cut))
        while len(self._buf.strip()) >= self.max_chars:
            out.append(self._take(self._forced_cut()))
        return [s for s in out if s]

    def ends_pending(self) -> bool:
        """The text so far ends with a mark that ends a sentence if what follows is whitespace."""
        buf = self._buf.rstrip(_CLOSERS)
        return bool(buf) and buf[-1] in _ENDS and self._may_end(buf, len(buf) - 1)

    def take_pending(self) -> str:
        """The text so far as a sentence (its wait for more ran out); "" when nothing is held."""
        return self._take(len(self._buf)) if self.ends_pending() else ""

    def flush(self) -> str:
        """Whatever is left, at the end of the stream."""
        return self._take(len(self._buf))

    def _take(self, cut: int) -> str:
        sentence, self._buf = self._buf[:cut], self._buf[cut:]
        return sentence.strip()

    def _ending(self) -> int | None:
        """Where the first complete sentence in the text ends (exclusive), or None."""
        buf = self._buf
        for i, ch in enumerate(buf):
            if ch in _WIDE_ENDS and len(buf[: i + 1].strip()) >= 1:
                return i + 1
            if ch == "\n" and i + 1 < len(buf) and buf[i + 1] == "\n" and buf[:i].strip():
                return i + 2
            if ch not in _ENDS:
                continue
            j = i + 1
            while j < len(buf) and buf[j] in _CLOSERS:
                j += 1
            if j < len(buf) and buf[j].isspace() and self._may_end(buf, i):
                return j
        return None

    def _may_end(self, buf: str, mark: int) -> bool:
        """Whether the mark at `mark` may end a sentence: long enough, and not an abbreviation."""
        if len(buf[: mark + 1].strip()) < self.min_chars:
            return False
        if buf[mark] != ".":
            return True
        word = buf[:mark].rsplit(None, 1)[-1].lstrip("(\"'").lower() if buf[:mark].strip() else ""
        if len(word) == 1 and word.isalpha():
            return False  # an initial: "J. R. R. Tolkien"
        return word not in _ABBREVIATIONS

    def _forced_cut(self) -> int:
        """Where to cut a run too long to wait for its ending: after its last clause mark, else its
        last space, else at max_chars."""
        window = self._buf[: self.max_chars]
        clauses = list(_CLAUSE.finditer(window))
        if clauses and clauses[-1].end() > self.min_chars:
            return clauses[-1].end()
        space = window.rfind(" ")
        return space + 1 if space > self.min_chars else self.max_chars
