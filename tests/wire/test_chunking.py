"""The decoder gives the same frames however the bytes are split (STYLE §7, chunking invariance)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casola.wire import ErrorCode, FrameDecoder, Limits, RemoteProtocolError
from fuzz.harness import decode_chunks
from tests.wire.vectorlib import load

CODEC = dict(load("codec"))
VALID = [bytes.fromhex(c["hex"]) for c in CODEC.values() if "frame" in c]
FOLLOWER = bytes.fromhex(next(c["hex"] for c in CODEC.values() if c["name"] == "CREDIT +1"))


feed = decode_chunks  # chunks (then EOF) -> (normalized frames, error code or None)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@pytest.mark.parametrize("case", CODEC.values(), ids=CODEC.keys())
def test_whole_equals_byte_by_byte(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    whole = feed([data])
    assert feed([data[i : i + 1] for i in range(len(data))]) == whole
    if "frame" in case:  # and with the next frame appended
        both = feed([data + FOLLOWER])
        assert both[1] is None and both[0][:1] == whole[0] and len(both[0]) == 2


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.sampled_from(range(len(VALID))), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=12),
)
def test_any_split_of_a_frame_sequence(picks: list[int], cuts: list[int]) -> None:
    data = b"".join(VALID[i] for i in picks)
    expected = feed([data])
    assert expected[1] is None and len(expected[0]) == len(picks)
    assert feed(split_at(data, cuts)) == expected


@settings(max_examples=200, deadline=None)
@given(
    case=st.sampled_from([c for c in CODEC.values() if "error" in c]),
    prefix=st.lists(st.sampled_from(range(len(VALID))), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=8),
)
def test_errors_after_valid_frames_keep_those_frames(case: dict[str, Any], prefix: list[int], cuts: list[int]) -> None:
    data = b"".join(VALID[i] for i in prefix) + bytes.fromhex(case["hex"])
    frames, code = feed(split_at(data, cuts))
    assert code is ErrorCode[case["error"]]
    assert len(frames) == len(prefix)


def test_a_short_read_does_not_move_the_cursor() -> None:
    data = VALID[0] + VALID[1]
    dec = FrameDecoder()
    for i in range(len(VALID[0]) - 1):
        assert dec.receive_data(data[i : i + 1]) == []
        assert dec.buffered == i + 1  # everything kept, nothing consumed
    assert len(dec.receive_data(data[len(VALID[0]) - 1 :])) == 2
    assert dec.buffered == 0


def test_large_payload_lands_in_its_own_buffer() -> None:
    limits = Limits(inline_max=1024, rx_buffer=64 * 1024)
    payload = bytes(range(256)) * 4096  # 1 MiB
    head = bytes.fromhex("0112000000000001" + "00000000" + len(payload).to_bytes(8, "big").hex())
    dec = FrameDecoder(limits)
    assert dec.receive_data(head + payload[:100]) == []
    target = dec.writable()
    assert len(target) == len(payload) - 100  # the tail of the payload's final buffer, not the rx buffer
    target[: len(target)] = payload[100:]
    (frame,) = dec.commit(len(target))
    assert isinstance(frame.payload, memoryview) and frame.payload.obj is target.obj
    assert frame.payload == payload


def test_after_an_error_every_call_raises_the_same_error() -> None:
    dec = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as first:
        dec.receive_data(b"\x09" + bytes(19))
    for call in (lambda: dec.receive_data(VALID[0]), dec.eof, lambda: dec.commit(0)):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        # The same error, raised afresh each time (a stored exception would keep its traceback,
        # and the decoder in a reference cycle with it).
        assert (again.value.code, again.value.message) == (first.value.code, first.value.message)
        assert again.value is not first.value
