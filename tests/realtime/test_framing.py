"""A realtime session's stream carries messages (docs/realtime.md, "Messages": a tag byte, a u32
big-endian length, the bytes), and DATA frame boundaries carry no meaning (SPEC §8): however the
stream's bytes are cut into payloads, the same messages come out, in order."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from casola.realtime.framing import FramingError, MessageReader, json_message, message


def laid_out(tag: int, data: bytes) -> bytes:
    return struct.pack("!BI", tag, len(data)) + data


def test_a_message_is_its_tag_its_length_and_its_bytes() -> None:
    assert message(1, b'{"type":"x"}') == b"\x01\x00\x00\x00\x0c" + b'{"type":"x"}'
    assert message(2, memoryview(b"\x00\x01" * 3)) == b"\x02\x00\x00\x00\x06" + b"\x00\x01" * 3
    assert message(2, b"") == b"\x02\x00\x00\x00\x00"
    assert json_message(msgspec.json.Encoder(), {"type": "x"}) == b"\x01\x00\x00\x00\x0c" + b'{"type":"x"}'


messages = st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=300)), max_size=8)


@given(messages, st.lists(st.integers(min_value=0, max_value=2000), max_size=10))
def test_any_cut_of_the_stream_gives_the_same_messages(sent: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(laid_out(tag, data) for tag, data in sent)
    reader = MessageReader()
    got: list[tuple[int, bytes]] = []
    start = 0
    for cut in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        got += [(tag, bytes(body)) for tag, body in reader.feed(stream[start:cut])]
        start = cut
    assert got == sent
    assert reader.pending == 0


def test_a_message_in_one_payload_is_a_view_of_it_not_a_copy() -> None:
    payload = laid_out(2, b"a" * 960) + laid_out(1, b"{}")
    (tag1, audio), (tag2, text) = MessageReader().feed(payload)
    assert (tag1, tag2) == (2, 1) and audio.obj is payload and bytes(text) == b"{}"


def test_a_message_begun_is_pending_until_its_last_byte() -> None:
    reader = MessageReader()
    data = laid_out(2, b"xyz")
    assert reader.feed(data[:2]) == [] and reader.pending == 2
    assert reader.feed(data[2:7]) == [] and reader.pending == 7
    ((tag, body),) = reader.feed(data[7:])
    assert (tag, bytes(body), reader.pending) == (2, b"xyz", 0)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_bad_tag_or_an_oversized_message_is_refused(split: bool) -> None:
    for bad, says in ((b"\x07\x00\x00\x00\x01x", "tag"), (laid_out(2, b"x" * 65), "over the limit of 64")):
        reader = MessageReader(max_message=64)
        with pytest.raises(FramingError, match=says):
            if split:
                for i in range(len(bad)):
                    reader.feed(bad[i : i + 1])
            else:
                reader.feed(bad)
