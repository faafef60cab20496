"""Every golden vector (protocol/vectors) against the codec and the connection state machines."""

from __future__ import annotations

from typing import Any

import pytest

from casola.wire import ErrorCode, FrameDecoder, FrameType, RemoteProtocolError, encode_frame
from tests.wire.vectorlib import (
    VECTORS,
    connection_for,
    event_matches,
    frame_from_json,
    load,
    normalize,
    sent_frames,
)

CODEC = dict(load("codec"))
CONNECTION = dict(load("connection"))


def decode_all(data: bytes) -> list[Any]:
    dec = FrameDecoder()
    frames = dec.receive_data(data)
    dec.eof()
    return frames


@pytest.mark.parametrize("case", CODEC.values(), ids=CODEC.keys())
def test_codec_vector(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    if "error" in case:
        with pytest.raises(RemoteProtocolError) as info:
            decode_all(data)
        assert info.value.code is ErrorCode[case["error"]]
        return
    expected = frame_from_json(case["frame"])
    assert normalize(decode_all(data)) == [expected]
    if case.get("canonical", True):
        assert b"".join(bytes(b) for b in encode_frame(expected)) == data


@pytest.mark.parametrize("case", CONNECTION.values(), ids=CONNECTION.keys())
def test_connection_vector(case: dict[str, Any]) -> None:
    conn = connection_for(case)
    data = bytes.fromhex(case["hex"])
    if "error" in case:
        with pytest.raises(RemoteProtocolError) as info:
            conn.receive_data(data, 1.0)
        assert info.value.code is ErrorCode[case["error"]]
        events = info.value.events
    else:
        events = conn.receive_data(data, 1.0)
    if "events" in case:
        assert len(events) == len(case["events"]), events
        for want, got in zip(case["events"], events, strict=True):
            assert event_matches(want, got), (want, got)
    if "sends" in case:
        sent = sent_frames(conn)
        assert len(sent) == len(case["sends"]), sent
        for want, got in zip(case["sends"], sent, strict=True):
            assert got.type is FrameType[want["type"]]
            if "code" in want:
                assert got.meta.code == ErrorCode[want["code"]]
            if "stream_id" in want:
                assert got.stream_id == want["stream_id"]
            if "payload_hex" in want:
                assert bytes(got.payload).hex() == want["payload_hex"]


def test_every_frame_type_has_valid_and_invalid_vectors() -> None:
    for ftype in FrameType:
        cases = [c for name, c in CODEC.items() if name.startswith(f"{ftype.name.lower()}:")]
        assert any("frame" in c for c in cases), ftype
        assert any("error" in c for c in cases), ftype
    assert (VECTORS / "header.json").exists() and (VECTORS / "connection.json").exists()


def test_vectors_cover_every_error_a_receiver_can_raise() -> None:
    raised = {c["error"] for c in [*CODEC.values(), *CONNECTION.values()] if "error" in c}
    receive_errors = {
        "BAD_VERSION", "UNKNOWN_FRAME_TYPE", "BAD_FLAGS", "FRAME_SIZE", "BAD_META", "BAD_STREAM_ID",
        "BAD_STATE", "CREDIT_VIOLATION", "UNSUPPORTED_VERSION", "TRUNCATED",
    }  # fmt: skip
    assert receive_errors <= raised
