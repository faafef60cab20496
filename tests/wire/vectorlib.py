"""Load the golden vectors (protocol/vectors, SPEC §10) and turn their JSON forms into casola objects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from casola.wire import Connection, ErrorCode, Frame, FrameDecoder, FrameType, Side, StreamReset
from casola.wire.events import ConnectionTerminated, Event
from casola.wire.meta import META_DEFAULTS, META_TYPES
from fuzz.harness import normalize

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def load(kind: str = "codec") -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, case) for every codec case (no "connection" key) or every connection case."""
    for path in sorted(VECTORS.glob("*.json")):
        for case in json.loads(path.read_text())["cases"]:
            if ("connection" in case) == (kind == "connection"):
                yield f"{path.stem}: {case['name']}", case


def frame_from_json(form: dict[str, Any]) -> Frame:
    ftype = FrameType[form["type"]]
    meta = form["meta"]
    if meta is None:
        meta_obj = META_DEFAULTS.get(ftype)
    else:
        cls = META_TYPES[ftype]
        meta_obj = msgspec.convert([meta[f] for f in cls.__struct_fields__], cls)
    return Frame(ftype, form["stream_id"], meta_obj, bytes.fromhex(form["payload_hex"]), form["flags"])


def event_matches(expected: dict[str, Any], actual: Event) -> bool:
    if "event" in expected:
        kind = {"STREAM_RESET": StreamReset, "CONNECTION_TERMINATED": ConnectionTerminated}[expected["event"]]
        if not isinstance(actual, kind):
            return False
        return all(
            getattr(actual, k) == (ErrorCode[v] if k == "code" else v) for k, v in expected.items() if k != "event"
        )
    return normalize([actual]) == [frame_from_json(expected)]


def decode_one(hexstr: str) -> Frame:
    frames = FrameDecoder().receive_data(bytes.fromhex(hexstr))
    assert len(frames) == 1
    return frames[0]


def connection_for(case: dict[str, Any], now: float = 0.0) -> Connection:
    """A connection driven into the state the case's `before` list describes."""
    ctx = case["connection"]
    conn = Connection(Side(ctx["side"]), now)
    for step in ctx["before"]:
        if "send" in step:
            conn.send(decode_one(step["send"]))
        else:
            conn.receive_data(bytes.fromhex(step["recv"]), now)
    conn.data_to_send()
    return conn


def sent_frames(conn: Connection) -> list[Frame]:
    data = b"".join(bytes(b) for b in conn.data_to_send())
    return FrameDecoder().receive_data(data) if data else []
