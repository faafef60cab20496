"""encode -> decode is the identity for generated frames, with values at the edges of every limit."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casola.wire import (
    FLAG_END,
    HEAD_SIZE,
    CreditMeta,
    EndMeta,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    RequestMeta,
    encode_frame,
)
from casola.wire.frames import FRAME_RULES
from casola.wire.meta import META_TYPES
from tests.wire.vectorlib import normalize

# Small limits so that every edge is cheap to reach.
EDGE = Limits(max_meta=256, max_payload=4096, inline_max=64, rx_buffer=HEAD_SIZE + 256 + 64)
U32, U63 = 2**32 - 1, 2**63 - 1


def value_strategy(info: msgspec.inspect.Type, text: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    """Values for one schema type, with integers drawn at the ends of their ranges."""
    mi = msgspec.inspect
    if isinstance(info, mi.IntType):
        lo = info.ge if info.ge is not None else -(2**63)
        hi = info.le if info.le is not None else U63
        return st.sampled_from([lo, lo + 1, hi - 1, hi]) | st.integers(lo, hi)
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, mi.StrType):
        return text
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.FloatType):
        return st.floats(allow_nan=False)
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.UnionType):
        return st.one_of([value_strategy(t, text) for t in info.types])
    if isinstance(info, mi.DictType):
        return st.dictionaries(text, value_strategy(info.value_type, text), max_size=3)
    if isinstance(info, mi.ListType):
        return st.lists(value_strategy(info.item_type, text), max_size=3)
    raise TypeError(info)


def meta_strategy(cls: type[msgspec.Struct], max_text: int) -> st.SearchStrategy[msgspec.Struct]:
    text = st.text(max_size=max_text)
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return st.builds(cls, **{f.name: value_strategy(f.type, text) for f in info.fields})


@st.composite
def frames(draw: st.DrawFn, limits: Limits) -> Frame:
    ftype = draw(st.sampled_from(list(FrameType)))
    rule = FRAME_RULES[ftype]
    sid = draw(st.sampled_from([1, 2, U32]) | st.integers(1, U32)) if rule.on_stream else 0
    meta = draw(meta_strategy(META_TYPES[ftype], 40)) if ftype in META_TYPES else None
    if rule.payload == 8:
        size = 8
    elif rule.payload == 0:
        size = 0
    else:
        edges = [0, 1, limits.inline_max - 1, limits.inline_max, limits.inline_max + 1, limits.max_payload]
        size = draw(st.sampled_from(edges) | st.integers(0, limits.max_payload))
    payload = draw(st.binary(min_size=size, max_size=size))
    flags = draw(st.sampled_from([0, rule.flags]))
    return Frame(ftype, sid, meta, payload, flags)


def roundtrip(frame: Frame, limits: Limits) -> Frame:
    buffers = encode_frame(frame, limits.max_meta, limits.max_payload)
    if frame.payload:
        assert buffers[1] is frame.payload  # lent, never concatenated
    (out,) = FrameDecoder(limits).receive_data(b"".join(bytes(b) for b in buffers))
    return out


@settings(max_examples=400, deadline=None)
@given(frame=frames(EDGE))
def test_roundtrip_small_limits(frame: Frame) -> None:
    try:
        encode_frame(frame, EDGE.max_meta, EDGE.max_payload)
    except LocalProtocolError as exc:  # metadata drawn past max_meta: refused before any byte
        assert exc.code is ErrorCode.FRAME_SIZE
        return
    assert normalize([roundtrip(frame, EDGE)]) == [frame]


@settings(max_examples=100, deadline=None)
@given(frame=frames(Limits(max_payload=1 << 20, inline_max=16 * 1024)))
def test_roundtrip_default_limits(frame: Frame) -> None:
    limits = Limits(max_payload=1 << 20)
    assert normalize([roundtrip(frame, limits)]) == [frame]


@pytest.mark.parametrize("extra", [0, 1])
def test_meta_at_and_past_max_meta(extra: int) -> None:
    meta = RequestMeta("m" * 0)
    base = len(encode_frame(Frame(FrameType.REQUEST, 1, meta))[0]) - HEAD_SIZE
    pad = EDGE.max_meta - base + extra
    meta = RequestMeta("m" * (pad - 1 if pad > 31 else pad))  # str header grows by one past 31 chars
    size = len(encode_frame(Frame(FrameType.REQUEST, 1, meta))[0]) - HEAD_SIZE
    assert size == EDGE.max_meta + extra
    frame = Frame(FrameType.REQUEST, 1, meta)
    if extra:
        with pytest.raises(LocalProtocolError):
            encode_frame(frame, EDGE.max_meta, EDGE.max_payload)
        data = b"".join(bytes(b) for b in encode_frame(frame))
        with pytest.raises(RemoteProtocolError) as info:
            FrameDecoder(EDGE).receive_data(data[:HEAD_SIZE])  # refused on the header alone
        assert info.value.code is ErrorCode.FRAME_SIZE
    else:
        assert roundtrip(frame, EDGE) == frame


@pytest.mark.parametrize("size", [EDGE.max_payload, EDGE.max_payload + 1])
def test_payload_at_and_past_max_payload(size: int) -> None:
    frame = Frame(FrameType.DATA, 1, None, bytes(size), FLAG_END)
    if size > EDGE.max_payload:
        with pytest.raises(LocalProtocolError):
            encode_frame(frame, EDGE.max_meta, EDGE.max_payload)
        head = encode_frame(frame)[0]
        with pytest.raises(RemoteProtocolError) as info:
            FrameDecoder(EDGE).receive_data(head)
        assert info.value.code is ErrorCode.FRAME_SIZE
    else:
        assert normalize([roundtrip(frame, EDGE)]) == [frame]


def test_default_metadata_encodes_as_length_zero() -> None:
    from casola.wire.meta import META_DEFAULTS

    (head,) = encode_frame(Frame(FrameType.END, 1, META_DEFAULTS[FrameType.END]))
    assert len(head) == HEAD_SIZE
    (head,) = encode_frame(Frame(FrameType.END, 1, EndMeta(timing={"work": 1.0})))
    assert len(head) > HEAD_SIZE


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.DATA, 1, CreditMeta(1)),  # DATA carries no metadata
        Frame(FrameType.REQUEST, 1, EndMeta()),  # wrong metadata type
        Frame(FrameType.REQUEST, 1, None),  # REQUEST needs metadata
        Frame(FrameType.CREDIT, 0, CreditMeta(1), b"x"),  # no payload on CREDIT
        Frame(FrameType.END, 1, None, b"", FLAG_END),  # END takes no flags
        Frame(FrameType.DATA, 0, None, b"x"),  # stream frame on stream 0
        Frame(FrameType.PING, 0, None, b"short"),  # PING payload is 8 bytes
    ],
    ids=lambda f: f.type.name,
)
def test_encoder_refuses_frames_that_break_the_rules(frame: Frame) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(frame)


def test_limits_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError):
        Limits(max_meta=64 * 1024, rx_buffer=64 * 1024)
    with pytest.raises(ValueError):
        Limits(max_streams=0)
