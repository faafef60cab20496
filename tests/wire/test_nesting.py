"""SPEC §4.2's nesting bound: arrays and maps at most 32 deep, the metadata array at depth 1, checked
without recursion in ignored elements (casola.wire.nesting) and refused as BAD_META."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from casola.wire import ErrorCode, FrameDecoder, RemoteProtocolError
from casola.wire.limits import MAX_META_DEPTH
from casola.wire.nesting import nests_too_deep

INTEGERS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # every msgpack integer form
SCALARS = (
    st.none()
    | st.booleans()
    | INTEGERS
    | st.floats(allow_nan=False)
    | st.text(max_size=300)  # fixstr, str8, str16
    | st.binary(max_size=300)  # bin8, bin16
    | st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary(max_size=20))  # fixext, ext8
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=5) | INTEGERS, inner, max_size=20),
    max_leaves=60,
)


def depth(value: Any) -> int:
    """How deep arrays and maps nest in `value` (a scalar: 0), as SPEC §4.2 counts."""
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((max(depth(k), depth(v)) for k, v in value.items()), default=0)
    return 0


def wrapped(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


@given(VALUES, st.integers(min_value=0, max_value=40), st.integers(min_value=1, max_value=40))
def test_the_scan_measures_what_the_spec_counts(value: Any, levels: int, limit: int) -> None:
    element = wrapped(value, levels)
    raw = memoryview(msgspec.msgpack.encode([element]))  # one ignored element: no known fields
    assert nests_too_deep(raw, 0, limit) == (1 + depth(element) > limit)


def test_known_fields_alone_are_never_scanned() -> None:
    deep = msgspec.msgpack.encode([wrapped(0, 40)])
    assert nests_too_deep(memoryview(deep), 1) is False  # no element beyond the schema's one field
    assert nests_too_deep(memoryview(deep), 0) is True


def test_the_bound_is_the_specs_and_deeper_is_bad_meta() -> None:
    assert MAX_META_DEPTH == 32
    hello = msgspec.msgpack.encode(["client", 1, 1, "", "", "", 0, 0, 0, [], "", []])  # 12 fields
    for levels, ok in ((MAX_META_DEPTH - 2, True), (MAX_META_DEPTH - 1, False), (10_000, False)):
        # HELLO's fields, then `[[...[]]]` with `levels` wrappers: its deepest array at levels + 2
        meta = b"\x9d" + hello[1:] + b"\x91" * levels + b"\x90"
        head = bytes([1, 1, 0, 0, 0, 0, 0, 0]) + len(meta).to_bytes(4, "big") + bytes(8)
        if ok:
            assert len(FrameDecoder().receive_data(head + meta)) == 1
            continue
        try:
            FrameDecoder().receive_data(head + meta)
        except RemoteProtocolError as exc:
            assert exc.code is ErrorCode.BAD_META
        else:
            raise AssertionError(f"{levels + 2} deep was accepted")
