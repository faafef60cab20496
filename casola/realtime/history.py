"""A session's conversation: what the user said (transcripts, or text the client added) and what the
agent said, kept as the client heard it. An agent item keeps each sentence with the span of audio
that spoke it, so a barge-in or `conversation.item.truncate` cuts its text where playback stopped:
the next turn's model never reads words the user did not hear."""

from __future__ import annotations

import dataclasses
from typing import Any, Final, Literal

__all__ = ["Conversation", "Item", "Spoken"]

Role = Literal["user", "assistant"]
_CUT_MARK: Final = "..."  # a sentence cut mid-way ends with this, as a transcript shows an interruption


@dataclasses.dataclass(slots=True)
class Spoken:
    """One sentence of an agent item and the audio that speaks it, [start_ms, end_ms) of the item's audio."""

    text: str
    start_ms: float
    end_ms: float


@dataclasses.dataclass(slots=True)
class Item:
    id: str
    role: Role
    text: str = ""  # the user's words; an agent item's text as heard (`heard()`)
    sentences: list[Spoken] = dataclasses.field(default_factory=list)
    audio_ms: float = 0.0  # an agent item's audio so far
    played_ms: float | None = None  # None: all of it was heard (not truncated)

    def heard(self) -> str:
        """What the user heard of it: every sentence whose audio started before `played_ms`, the one
        playing then cut after its share of words."""
        if self.role == "user":
            return self.text
        if self.played_ms is None:
            return " ".join(s.text for s in self.sentences)
        out: list[str] = []
        for s in self.sentences:
            if s.start_ms >= self.played_ms:
                break
            if s.end_ms <= self.played_ms:
                out.append(s.text)
                continue
            words = s.text.split()
            share = (self.played_ms - s.start_ms) / max(s.end_ms - s.start_ms, 1e-9)
            kept = words[: int(len(words) * share)]
            if kept:
                out.append(" ".join(kept) + _CUT_MARK)
            break
        return " ".join(out)


class Conversation:
    """The items of one session in order, at most `max_items` (the oldest go first)."""

    def __init__(self, max_items: int = 64) -> None:
        self.max_items = max_items
        self.items: list[Item] = []
        self._n: dict[str, int] = {}

    def new_id(self, prefix: str = "item") -> str:
        n = self._n[prefix] = self._n.get(prefix, 0) + 1
        return f"{prefix}_{n}"

    def add(self, role: Role, text: str = "", item_id: str = "") -> Item:
        item = Item(item_id or self.new_id(), role, text)
        self.items.append(item)
        if len(self.items) > self.max_items:
            del self.items[: len(self.items) - self.max_items]
        return item

    def find(self, item_id: str) -> Item | None:
        return next((i for i in reversed(self.items) if i.id == item_id), None)

    def delete(self, item_id: str) -> bool:
        item = self.find(item_id)
        if item is not None:
            self.items.remove(item)
        return item is not None

    def truncate(self, item_id: str, audio_end_ms: float) -> Item:
        """The agent item's text cut to what `audio_end_ms` of its audio spoke.

        Raises:
            KeyError: no such item. ValueError: not an agent item, or past its audio.
        """
        item = self.find(item_id)
        if item is None:
            raise KeyError(item_id)
        if item.role != "assistant":
            raise ValueError(f"item {item_id!r} is the user's: only the agent's audio is truncated")
        if audio_end_ms < 0 or audio_end_ms > item.audio_ms + 1:
            raise ValueError(f"audio_end_ms {audio_end_ms:g} is outside the item's {item.audio_ms:.0f} ms of audio")
        item.played_ms = min(audio_end_ms, item.played_ms if item.played_ms is not None else audio_end_ms)
        return item

    def waiting_for_answer(self) -> bool:
        """The last item is the user's: a turn has something to answer."""
        return bool(self.items) and self.items[-1].role == "user"

    def messages(self) -> list[dict[str, Any]]:
        """The chat turns for the model: each item as heard, empty ones left out, a run of one
        speaker's items joined (a chat template alternates)."""
        out: list[dict[str, Any]] = []
        for item in self.items:
            text = item.heard().strip()
            if not text:
                continue
            if out and out[-1]["role"] == item.role:
                out[-1]["content"] += " " + text
            else:
                out.append({"role": item.role, "content": text})
        while out and out[0]["role"] != "user":  # the oldest dropped: a conversation starts with the user
            out.pop(0)
        return out
