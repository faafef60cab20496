"""A session's conversation keeps what the user heard (issue 16 deliverable 6): an agent answer cut
by a barge-in or `truncate` keeps the sentences whose audio played, the one playing cut after its
share of words; the model's next turn reads that, never the words the user did not hear."""

from __future__ import annotations

import pytest

from casola.realtime.history import Conversation, Spoken


def answer(conv: Conversation) -> str:
    item = conv.add("assistant")
    item.sentences = [
        Spoken("It is sunny in Paris.", 0, 1000),
        Spoken("Take a hat and some water with you.", 1000, 3000),
        Spoken("Have a lovely day!", 3000, 4000),
    ]
    item.audio_ms = 4000
    return item.id


def test_an_answer_heard_whole_is_kept_whole() -> None:
    conv = Conversation()
    conv.add("user", "What is the weather?")
    answer(conv)
    conv.add("user", "Thanks")
    assert conv.messages() == [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": " ".join(s.text for s in conv.items[1].sentences)},
        {"role": "user", "content": "Thanks"},
    ]


@pytest.mark.parametrize(
    ("played", "heard"),
    [
        (0, ""),
        (500, "It is..."),
        (1000, "It is sunny in Paris."),
        (2000, "It is sunny in Paris. Take a hat and..."),
        (3999, "It is sunny in Paris. Take a hat and some water with you. Have a lovely..."),
    ],
)
def test_a_truncated_answer_keeps_what_played(played: float, heard: str) -> None:
    conv = Conversation()
    conv.add("user", "What is the weather?")
    item = conv.truncate(answer(conv), played)
    assert item.heard() == heard


def test_truncation_only_ever_shortens_and_is_checked() -> None:
    conv = Conversation()
    conv.add("user", "hi")
    rid = answer(conv)
    conv.truncate(rid, 2000)
    conv.truncate(rid, 3500)  # a later, longer ack cannot bring back words already cut
    assert conv.find(rid).heard() == "It is sunny in Paris. Take a hat and..."  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        conv.truncate("item_99", 10)
    with pytest.raises(ValueError, match="outside"):
        conv.truncate(rid, 9000)
    with pytest.raises(ValueError, match="user"):
        conv.truncate(conv.items[0].id, 10)


def test_the_model_reads_alternating_turns_starting_with_the_user() -> None:
    conv = Conversation(max_items=3)
    conv.add("user", "one")
    conv.add("assistant", "two")
    conv.add("user", "three")
    conv.add("user", "four")  # the oldest item goes; two user items in a row are one turn
    assert conv.messages() == [{"role": "user", "content": "three four"}]
    assert conv.waiting_for_answer()
    empty = conv.add("assistant")  # an answer cut before any audio says nothing
    assert conv.messages()[-1]["role"] == "user" and not conv.waiting_for_answer() and empty.heard() == ""
