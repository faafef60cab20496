"""REQUEST field 14, `filter`: the caller's content-filter policy, appended in a compatible way (SPEC §4.2)."""

from __future__ import annotations

import msgspec
import pytest

from casola.wire import FLAG_END, Frame, FrameDecoder, FrameType, RemoteProtocolError, RequestMeta, encode_frame
from casola.wire.frames import HEAD


def _request(meta: bytes) -> bytes:
    return HEAD.pack(1, FrameType.REQUEST, FLAG_END, 1, len(meta), 0) + meta


def _decode(data: bytes) -> RequestMeta:
    (frame,) = FrameDecoder().receive_data(data)
    assert isinstance(frame.meta, RequestMeta)
    return frame.meta


def test_filter_is_the_fifteenth_element_and_round_trips() -> None:
    meta = RequestMeta("echo", tenant="t1", filter="block")
    wire = b"".join(bytes(b) for b in encode_frame(Frame(FrameType.REQUEST, 1, meta, b"", FLAG_END)))
    array = msgspec.msgpack.decode(wire[HEAD.size :])
    assert len(array) >= 15 and array[14] == "block"  # later fields (request_id, ...) follow it
    assert _decode(wire) == meta


@pytest.mark.parametrize("n", [1, 6, 14])
def test_an_older_sender_s_shorter_array_means_no_key_policy(n: int) -> None:
    full = msgspec.msgpack.decode(msgspec.msgpack.encode(RequestMeta("echo", tenant="t1")))
    meta = _decode(_request(msgspec.msgpack.encode(full[:n])))
    assert meta.model == "echo" and meta.filter == ""


def test_the_short_array_of_the_spec_example_decodes() -> None:
    assert _decode(_request(bytes.fromhex("91a46563686f"))) == RequestMeta("echo")


@pytest.mark.parametrize("value", ["strict", "BLOCK", 1])
def test_a_filter_outside_its_value_set_is_bad_meta(value: object) -> None:
    full = msgspec.msgpack.decode(msgspec.msgpack.encode(RequestMeta("echo")))
    with pytest.raises(RemoteProtocolError) as err:
        FrameDecoder().receive_data(_request(msgspec.msgpack.encode([*full[:14], value])))
    assert err.value.code.name == "BAD_META"
