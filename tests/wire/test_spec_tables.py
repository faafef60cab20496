"""casola.wire says what SPEC.md's tables say, read from the markdown (protocol/spectables.py).

§3's frame type bytes, §4.3's field tables (names, order, defaults, which are required), §4.1's
value ranges, §4.5's worked example, §5.2's stream table and §6.1's life-cycle tables: a field
reordered, a default changed or a transition moved in the code and not in the spec fails here.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from casola.wire import FLAG_END, Frame, FrameType, RequestMeta, encode_frame
from casola.wire import lifecycle as lc
from casola.wire import stream as st
from casola.wire.meta import META_DECODERS, META_TYPES
from protocol.spectables import (
    REQUIRED,
    Field,
    field_tables,
    frame_type_bytes,
    section,
    spec_text,
    stream_end_transitions,
    stream_transitions,
)
from tests.wire.spec import LIFECYCLE, STREAM, STREAM_WITH_END

TEXT = spec_text()
TABLES = field_tables(TEXT)


def code_default(f: msgspec.structs.FieldInfo) -> Any:
    """A struct field's default as the spec writes it: REQUIRED, or a plain value (IntEnum -> int)."""
    if f.default is not msgspec.NODEFAULT:
        value = f.default
    elif f.default_factory is not msgspec.NODEFAULT:
        value = f.default_factory()
    else:
        return REQUIRED
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


# -- §3, §4.3 ---------------------------------------------------------------------------------------


def test_frame_type_bytes_are_the_specs() -> None:
    assert frame_type_bytes(TEXT) == {t.name: int(t) for t in FrameType}


def test_every_type_with_metadata_has_a_field_table_and_a_struct() -> None:
    assert set(TABLES) == {t.name for t in META_TYPES}


@pytest.mark.parametrize("ftype", list(META_TYPES), ids=lambda t: t.name)
def test_struct_fields_are_the_specs_names_in_order(ftype: FrameType) -> None:
    spec = [f.name for f in TABLES[ftype.name]]
    assert list(META_TYPES[ftype].__struct_fields__) == spec


@pytest.mark.parametrize("ftype", list(META_TYPES), ids=lambda t: t.name)
def test_struct_defaults_are_the_specs(ftype: FrameType) -> None:
    code = {f.name: code_default(f) for f in msgspec.structs.fields(META_TYPES[ftype])}
    for f in TABLES[ftype.name]:
        assert code[f.name] == f.default and type(code[f.name]) is type(f.default), (ftype.name, f.name)


def minimal(fields: list[Field], at: int, value: Any) -> list[Any]:
    """A metadata array with the required fields filled in and field `at` set to `value`."""
    out: list[Any] = []
    for f in fields[: at + 1]:
        if f.index == at:
            out.append(value)
        elif not f.required:
            out.append(f.default)
        elif choices := _choices(f.type):
            out.append(choices[0])
        else:
            out.append("x" if f.type == "str" else 1)
    return out


def _choices(type_text: str) -> list[str]:
    m = re.search(r"∈ \{(.*)\}", type_text)
    return [c.strip().strip('"') for c in m.group(1).split(",")] if m else []


RANGES = {"u8": (0, 2**8 - 1), "u16": (0, 2**16 - 1), "u32": (0, 2**32 - 1), "u63": (0, 2**63 - 1), "i8": (-128, 127)}
INTEGER_FIELDS = [
    (ftype, f) for ftype in META_TYPES for f in TABLES[ftype.name] if f.type in RANGES or f.type.startswith("integer")
]


@pytest.mark.parametrize(("ftype", "field"), INTEGER_FIELDS, ids=lambda v: getattr(v, "name", ""))
def test_integer_fields_take_exactly_the_specs_range(ftype: FrameType, field: Field) -> None:
    """§4.1: `uN` is 0 .. 2^N-1, `i8` -128 .. 127; CREDIT's grant is written out as 1 .. 2^31-1."""
    if field.type.startswith("integer"):
        low, high = 1, 2**31 - 1
    else:
        low, high = RANGES[field.type]
    decoder = META_DECODERS[ftype]
    fields = TABLES[ftype.name]
    for ok in (low, high):
        assert getattr(decoder.decode(msgspec.msgpack.encode(minimal(fields, field.index, ok))), field.name) == ok
    for bad in (low - 1, high + 1):
        with pytest.raises(msgspec.ValidationError):
            decoder.decode(msgspec.msgpack.encode(minimal(fields, field.index, bad)))


CHOICE_FIELDS = [(ftype, f) for ftype in META_TYPES for f in TABLES[ftype.name] if _choices(f.type)]


@pytest.mark.parametrize(("ftype", "field"), CHOICE_FIELDS, ids=lambda v: getattr(v, "name", ""))
def test_string_fields_take_exactly_the_specs_value_set(ftype: FrameType, field: Field) -> None:
    decoder, fields = META_DECODERS[ftype], TABLES[ftype.name]
    for value in _choices(field.type):
        assert getattr(decoder.decode(msgspec.msgpack.encode(minimal(fields, field.index, value))), field.name) == value
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(msgspec.msgpack.encode(minimal(fields, field.index, "not-in-the-set")))


def test_the_worked_example_is_what_the_reference_encoder_writes() -> None:
    """§4.5 shows the bytes of `Frame(REQUEST, 1, RequestMeta("echo"), b"hi", FLAG_END)`."""
    block = re.search(r"```\n([0-9a-f ]+)\n```", section(TEXT, "4.5"))
    assert block is not None
    example = bytes.fromhex(block.group(1).replace(" ", ""))
    frame = Frame(FrameType.REQUEST, 1, RequestMeta("echo"), b"hi", FLAG_END)
    assert b"".join(bytes(b) for b in encode_frame(frame)) == example
    rows = [r for r in section(TEXT, "4.5").splitlines() if re.match(r"\| \d+ \| `", r)]
    assert int(rows[-1].split("|")[1]) + 2 == len(example)  # the table's offsets end with the payload


# -- §5.2, §6.1 ---------------------------------------------------------------------------------------


def test_stream_table_is_the_specs() -> None:
    assert st.TRANSITIONS == STREAM


def test_flag_end_table_is_the_frame_then_end() -> None:
    """§5.2: X + FLAG_END is X, then END from the same sender; the spec's second table lists the
    results, and it must agree with the first table (spec against itself, then code against both)."""
    table = stream_transitions(TEXT)
    composed = {
        (s, o, t): table[(n, o, "END")]
        for (s, o, t), n in table.items()
        if t in ("REQUEST", "RESPONSE", "DATA") and (n, o, "END") in table
    }
    assert composed == stream_end_transitions(TEXT)
    for (state, sender, ftype), after in STREAM_WITH_END.items():
        assert st.next_state(state, sender, ftype, True) is after


def test_lifecycle_table_is_the_specs() -> None:
    assert lc.TRANSITIONS == LIFECYCLE
