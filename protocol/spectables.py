"""SPEC.md's tables as data, read from the markdown itself: the oracle of the vectors and the tests.

The metadata field tables (§4.3), the stream state table (§5.2) and the connection life-cycle tables
(§6.1) are read here from their text, so that `make_vectors.py` builds its bytes and the tests take
their expected states from the spec, never from `casola.wire`: a change to the code that breaks the
spec then fails a test instead of moving the oracle with it. This module imports nothing of casola.

A table is a run of lines starting with `|`: a header row, a separator row, then rows with as many
cells as the header. Cells are stripped of spaces; code spans keep their backticks until a reader
below takes them off.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "REQUIRED",
    "SPEC",
    "Field",
    "constants",
    "established_transitions",
    "field_tables",
    "frame_type_bytes",
    "handshake_transitions",
    "section",
    "spec_text",
    "stream_end_transitions",
    "stream_transitions",
    "tables",
]

SPEC: Final = Path(__file__).resolve().parent / "SPEC.md"
REQUIRED: Final = "req."  # the default column of a required field

_HEADING = re.compile(r"^(#+) ")


@dataclass(frozen=True)
class Field:
    """One row of a §4.3 field table."""

    index: int
    name: str
    type: str  # as written, e.g. "u32" or "str ∈ {client, ingress}"
    default: Any  # the default as a value (int, float, bool, str, list, dict), or REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def section(text: str, number: str) -> str:
    """The text of the section whose heading starts with `number` (e.g. "4.3", "5.2"), up to the
    next heading of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _HEADING.match(line)
        if m and line[m.end() :].startswith(number + " "):
            level = len(m.group(1))
            body = []
            for later in lines[i + 1 :]:
                n = _HEADING.match(later)
                if n and len(n.group(1)) <= level:
                    break
                body.append(later)
            return "\n".join(body)
    raise KeyError(f"SPEC.md has no section {number}")


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every table in `text`, in order, as rows keyed by the header's cells."""
    found: list[list[dict[str, str]]] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            found.append(_table(block))
            block = []
    return found


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(block: list[str]) -> list[dict[str, str]]:
    head = _cells(block[0])
    if len(block) < 2 or not set(block[1].replace("|", "").strip()) <= set("-: "):
        raise ValueError(f"not a table (no separator row): {block[0]}")
    rows = []
    for line in block[2:]:
        cells = _cells(line)
        if len(cells) != len(head):
            raise ValueError(f"{len(cells)} cells where the header has {len(head)}: {line}")
        rows.append(dict(zip(head, cells, strict=True)))
    return rows


def _table_with(text: str, header: list[str]) -> list[dict[str, str]]:
    for table in tables(text):
        if table and list(table[0]) == header:
            return table
    raise KeyError(f"no table with the header {header}")


def _plain(cell: str) -> str:
    """A cell without its code-span backticks."""
    return cell.replace("`", "")


def _default(cell: str) -> Any:
    """`req.`, or the default as written: `""`, `[]`, `{}`, `true`, 0, 0.0, "0 (`NO_ERROR`)" (a
    number followed by the name of its code)."""
    if cell == REQUIRED:
        return REQUIRED
    value = re.sub(r"\s*\(.*\)$", "", cell).replace("`", "")
    return json.loads(value)


# -- §3 and §4.3: frame types and metadata fields ----------------------------------------------------


def frame_type_bytes(text: str) -> dict[str, int]:
    """Frame type name -> type byte, from §3's table."""
    rows = _table_with(section(text, "3."), ["type", "byte", "stream id", "metadata", "payload", "flags", "sent by"])
    return {r["type"]: int(_plain(r["byte"]), 16) for r in rows}


def field_tables(text: str) -> dict[str, list[Field]]:
    """Frame type name -> its metadata fields in wire order, from §4.3 (one `#### NAME (0xNN)`
    heading and one table per type)."""
    body = section(text, "4.3")
    out: dict[str, list[Field]] = {}
    for part in re.split(r"^#### ", body, flags=re.M)[1:]:
        name = part.split(None, 1)[0]
        rows = _table_with(part, ["#", "field", "type", "default", "meaning"])
        fields = [Field(int(r["#"]), _plain(r["field"]), _plain(r["type"]), _default(r["default"])) for r in rows]
        if [f.index for f in fields] != list(range(len(fields))):
            raise ValueError(f"{name}: field numbers are not 0, 1, 2, ...")
        out[name] = fields
    return out


def constants(text: str) -> dict[str, int]:
    """§8's fixed protocol constants: name -> value (`2^32 - 1` and the like evaluated)."""
    rows = _table_with(section(text, "8."), ["constant", "value", "meaning"])
    out: dict[str, int] = {}
    for r in rows:
        value = _plain(r["value"]).replace(" ", "")
        base, _, rest = value.partition("^")
        if rest:
            exponent, _, minus = rest.partition("-")
            out[r["constant"]] = int(base) ** int(exponent) - int(minus or 0)
        else:
            out[r["constant"]] = int(value)
    return out


# -- §5.2: stream states ------------------------------------------------------------------------------

StreamKey = tuple[str, str, str]  # (state, "O" or "R", frame type)


def stream_transitions(text: str) -> dict[StreamKey, str]:
    """(state, sender, frame type) -> next state for every legal input of §5.2's state table;
    "—" cells are left out (illegal)."""
    body = section(text, "5.2")
    table = next(t for t in tables(body) if t and next(iter(t[0])) == "state" and "O REQUEST" in t[0])
    out: dict[StreamKey, str] = {}
    for row in table:
        for column, cell in row.items():
            if column == "state" or cell == "—":
                continue
            sender, ftype = column.split()
            out[(row["state"], sender, ftype)] = cell
    return out


def stream_end_transitions(text: str) -> dict[StreamKey, str]:
    """(state, sender, frame type) -> next state for a frame carrying FLAG_END, from §5.2's second
    table (every pair not listed is illegal with FLAG_END)."""
    body = section(text, "5.2")
    table = _table_with(body, ["state", "frame with `FLAG_END`", "next"])
    out: dict[StreamKey, str] = {}
    for row in table:
        sender, ftype = row["frame with `FLAG_END`"].split()
        out[(row["state"], sender, ftype)] = row["next"]
    return out


# -- §6.1: connection life cycle ----------------------------------------------------------------------

LifeKey = tuple[str, str, str, str]  # (side, state, "send" or "receive", kind)
KINDS: Final = ("HELLO", "HELLO_ACK", "GOAWAY(0)", "GOAWAY(err)", "CONTROL", "NEW_STREAM", "STREAM")


def handshake_transitions(text: str) -> dict[LifeKey, str]:
    """(side, state, direction, kind) -> next state, from §6.1's handshake table; the input column
    reads "send HELLO", "receive GOAWAY(err)", ..."""
    rows = _table_with(section(text, "6.1"), ["side", "state", "input", "next", "note"])
    out: dict[LifeKey, str] = {}
    for r in rows:
        direction, kind = r["input"].split()
        if direction not in ("send", "receive") or kind not in KINDS:
            raise ValueError(f"unreadable input {r['input']!r}")
        out[(r["side"], r["state"], direction, kind)] = r["next"]
    return out


def established_transitions(text: str) -> dict[LifeKey, str]:
    """§6.1's established table, which is "the same for both sides and for sending and receiving",
    spelled out for each (side, direction); "—" cells (with or without a note) are left out."""
    head = ["state", "CONTROL", "NEW_STREAM", "STREAM", "GOAWAY(0)", "GOAWAY(err)"]
    rows = _table_with(section(text, "6.1"), head)
    out: dict[LifeKey, str] = {}
    for r in rows:
        for kind in head[1:]:
            if r[kind].startswith("—"):
                continue
            for side in ("dialer", "acceptor"):
                for direction in ("send", "receive"):
                    out[(side, r["state"], direction, kind)] = r[kind]
    return out
