"""Write the golden vectors in `protocol/vectors/` (SPEC §10).

The bytes are built here by hand: `struct` for the header and generic msgpack of plain lists for the
metadata, never casola's own encoder, so the vector tests check the codec against an independent
construction. The type bytes, field names, field order and defaults come from SPEC.md itself (§3's
table and §4.3's field tables, read by `protocol/spectables.py`), never from `casola.wire`: a field
reordered in the code and not in the spec fails the vectors.

Usage:  python protocol/make_vectors.py           # rewrite the files
        python protocol/make_vectors.py --check   # exit 1 if a file is stale
"""

from __future__ import annotations

import copy
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from outputs import write_or_check  # protocol/ is sys.path[0] when run as a script

from protocol.spectables import constants, field_tables, frame_type_bytes, spec_text

OUT = Path(__file__).resolve().parent / "vectors"
HEAD = struct.Struct("!BBHIIQ")
SPEC_TEXT = spec_text()
T = frame_type_bytes(SPEC_TEXT)  # §3: frame type name -> type byte
FIELDS = field_tables(SPEC_TEXT)  # §4.3: frame type name -> fields in wire order, with defaults
END = 0x0001
MAX_META, MAX_PAYLOAD = 16 * 1024, 16 * 1024 * 1024
MAX_META_DEPTH = constants(SPEC_TEXT)["metadata nesting depth"]  # §4.2, §8


def fields(ftype: str, **values: Any) -> dict[str, Any]:
    """Every field of the type's metadata (SPEC §4.3), in wire order, defaults filled in."""
    out: dict[str, Any] = {}
    for f in FIELDS[ftype]:
        if f.name in values:
            out[f.name] = values.pop(f.name)
        elif f.required:
            raise KeyError(f"{ftype}.{f.name} is required")
        else:
            out[f.name] = copy.deepcopy(f.default)  # [] and {} are never shared between cases
    assert not values, f"unknown fields {values}"
    return out


def raw(ftype: int, sid: int = 0, flags: int = 0, meta: bytes = b"", payload: bytes = b"", version: int = 1) -> str:
    return (HEAD.pack(version, ftype, flags, sid, len(meta), len(payload)) + meta + payload).hex()


def mp(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def valid(
    name: str,
    spec: str,
    ftype: str,
    sid: int = 0,
    flags: int = 0,
    meta: dict[str, Any] | None = None,
    payload: bytes = b"",
    canonical: bool = True,
    meta_bytes: bytes | None = None,
) -> dict[str, Any]:
    """A case that decodes to `meta` (None: no metadata or all defaults, length 0)."""
    mbytes = meta_bytes if meta_bytes is not None else (b"" if meta is None else mp(list(meta.values())))
    case: dict[str, Any] = {"name": name, "spec": spec, "hex": raw(T[ftype], sid, flags, mbytes, payload)}
    case["frame"] = {"type": ftype, "stream_id": sid, "flags": flags, "meta": meta, "payload_hex": payload.hex()}
    if not canonical:
        case["canonical"] = False  # decodes as shown; re-encoding gives the canonical bytes instead
    return case


def invalid(name: str, spec: str, hexstr: str, error: str) -> dict[str, Any]:
    return {"name": name, "spec": spec, "hex": hexstr, "error": error}


def common_invalid(ftype: str) -> list[dict[str, Any]]:
    """Framing errors every type has: bad flags, wrong stream-id class, undecodable metadata."""
    t, on_stream = T[ftype], T[ftype] >= 0x10
    sid_ok, sid_bad = (1, 0) if on_stream else (0, 1)
    cases = [
        invalid(f"{ftype} with reserved flag bit 0x8000", "§2.2", raw(t, sid_ok, 0x8000), "BAD_FLAGS"),
        invalid(f"{ftype} on the wrong stream id class", "§2.3", raw(t, sid_bad), "BAD_STREAM_ID"),
    ]
    if ftype in ("DATA", "PING", "PONG"):
        cases.append(invalid(f"{ftype} carrying metadata", "§3", raw(t, sid_ok, meta=b"\x90"), "FRAME_SIZE"))
    else:
        cases.append(
            invalid(
                f"{ftype} metadata is not msgpack (0xc1 is never used)", "§4", raw(t, sid_ok, meta=b"\xc1"), "BAD_META"
            )
        )
        cases.append(
            invalid(f"{ftype} metadata is a map, not an array", "§4", raw(t, sid_ok, meta=mp({"a": 1})), "BAD_META")
        )
    if ftype in ("HELLO", "HELLO_ACK", "GOAWAY", "CREDIT", "HEARTBEAT", "END", "ERROR", "CANCEL"):
        cases.append(invalid(f"{ftype} carrying a payload", "§3", raw(t, sid_ok, payload=b"x"), "FRAME_SIZE"))
    return cases


def nested(depth: int, kind: str = "array") -> bytes:
    """An element to append to a metadata array so that the deepest container sits at `depth` (the
    metadata array being depth 1): arrays `[[...[]]]`, or maps `{"": {"": ... {}}}`."""
    opener, empty = (b"\x91", b"\x90") if kind == "array" else (b"\x81\xa0", b"\x80")
    return opener * (depth - 2) + empty


def heartbeat_with(element: bytes) -> bytes:
    """HEARTBEAT metadata (all defaults, written out) followed by one element a v1 receiver ignores."""
    return bytes([0x90 + len(FIELDS["HEARTBEAT"]) + 1]) + mp(list(fields("HEARTBEAT").values()))[1:] + element


def by_type() -> dict[str, list[dict[str, Any]]]:
    hello = fields(
        "HELLO",
        role="worker",
        credential="wk_test",
        node_id="w1",
        region="eu-west",
        credit=4,
        models=["echo", "whisper-tiny"],
        pool="sync",
    )
    ack = fields("HELLO_ACK", version=1, node_id="q1", region="eu-west", credit=256)
    req = fields("REQUEST", model="echo", deadline_ms=1000, trace=True)
    req_full = fields(
        "REQUEST",
        model="llm",
        deadline_ms=30000,
        content_type="application/json",
        params={"temperature": 0.7, "max_tokens": 64, "stream": True, "stop": None},
        tenant="t1",
        priority=-3,
        job_id="job-42",
        fence=7,
        attempt=1,
        filter="block",
        request_id="req-7f3a",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        tracestate="vendor=opaque",
    )
    v: dict[str, list[dict[str, Any]]] = {
        "HELLO": [
            valid("worker HELLO", "§3.1", "HELLO", meta=hello),
            valid("client HELLO, defaults", "§3.1", "HELLO", meta=fields("HELLO", role="client")),
            valid(
                "older sender: only the required field",
                "§4.2",
                "HELLO",
                meta=fields("HELLO", role="client"),
                meta_bytes=mp(["client"]),
                canonical=False,
            ),
            invalid("HELLO with zero-length metadata (role is required)", "§4", raw(0x01), "BAD_META"),
            invalid("HELLO with an unknown role", "§4", raw(0x01, meta=mp(["admin"])), "BAD_META"),
            invalid("HELLO with max_version 256", "§4", raw(0x01, meta=mp(["client", 1, 256])), "BAD_META"),
        ],
        "HELLO_ACK": [
            valid("HELLO_ACK granting 256 streams", "§3.2", "HELLO_ACK", meta=ack),
            invalid("HELLO_ACK without version", "§4", raw(0x02, meta=mp([])), "BAD_META"),
        ],
        "PING": [
            valid("PING", "§3.3", "PING", payload=bytes(range(8))),
            invalid("PING with a 7-byte payload", "§3.3", raw(0x03, payload=bytes(7)), "FRAME_SIZE"),
            invalid("PING with a 9-byte payload", "§3.3", raw(0x03, payload=bytes(9)), "FRAME_SIZE"),
        ],
        "PONG": [
            valid("PONG", "§3.4", "PONG", payload=b"\x00\x00\x00\x00\x00\x00\x00\x2a"),
            invalid("PONG without payload", "§3.4", raw(0x04), "FRAME_SIZE"),
        ],
        "GOAWAY": [
            valid("graceful GOAWAY, all defaults (length 0)", "§3.5", "GOAWAY", meta=None),
            valid(
                "GOAWAY draining after stream 7",
                "§6.5",
                "GOAWAY",
                meta=fields("GOAWAY", code=14, last_stream_id=7, message="restarting", retry_after_ms=500),
            ),
            valid("GOAWAY with a code from a newer version", "§9", "GOAWAY", meta=fields("GOAWAY", code=999)),
            invalid("GOAWAY code above u16", "§4", raw(0x05, meta=mp([70000])), "BAD_META"),
            invalid(
                "GOAWAY message is not UTF-8 (found by fuzzing)",
                "§4",
                raw(0x05, meta=b"\x94\x0e\x07\xaare\x89\x8barting\xcd\x01\xf4"),
                "BAD_META",
            ),
        ],
        "CREDIT": [
            valid("CREDIT +1", "§3.6", "CREDIT", meta=fields("CREDIT", grant=1)),
            valid("CREDIT at the counter's maximum", "§7", "CREDIT", meta=fields("CREDIT", grant=2**31 - 1)),
            invalid("CREDIT +0", "§7", raw(0x06, meta=mp([0])), "BAD_META"),
            invalid("CREDIT +2^31", "§7", raw(0x06, meta=mp([2**31])), "BAD_META"),
            invalid("CREDIT without metadata", "§4", raw(0x06), "BAD_META"),
        ],
        "HEARTBEAT": [
            valid(
                "HEARTBEAT",
                "§3.7",
                "HEARTBEAT",
                meta=fields("HEARTBEAT", active=2, capacity=4, load=0.5, stats={"gpu_mem": 0.25}),
            ),
            valid("HEARTBEAT, all defaults", "§3.7", "HEARTBEAT", meta=None),
            invalid("HEARTBEAT load is a string", "§4", raw(0x07, meta=mp([1, 2, True, "hi"])), "BAD_META"),
            valid(
                f"newer sender: an ignored element with arrays nested {MAX_META_DEPTH} deep",
                "§4.2",
                "HEARTBEAT",
                meta=fields("HEARTBEAT"),
                meta_bytes=heartbeat_with(nested(MAX_META_DEPTH)),
                canonical=False,
            ),
            valid(
                f"newer sender: an ignored element with maps nested {MAX_META_DEPTH} deep",
                "§4.2",
                "HEARTBEAT",
                meta=fields("HEARTBEAT"),
                meta_bytes=heartbeat_with(nested(MAX_META_DEPTH, "map")),
                canonical=False,
            ),
            invalid(
                f"ignored element with arrays nested {MAX_META_DEPTH + 1} deep",
                "§4.2",
                raw(0x07, meta=heartbeat_with(nested(MAX_META_DEPTH + 1))),
                "BAD_META",
            ),
            invalid(
                f"ignored element with maps nested {MAX_META_DEPTH + 1} deep",
                "§4.2",
                raw(0x07, meta=heartbeat_with(nested(MAX_META_DEPTH + 1, "map"))),
                "BAD_META",
            ),
            invalid(
                "ignored element with arrays nested 5000 deep (no decoder may run out of stack)",
                "§4.2",
                raw(0x07, meta=heartbeat_with(nested(5000))),
                "BAD_META",
            ),
        ],
        "REQUEST": [
            valid("REQUEST with FLAG_END: one frame", "§3.8", "REQUEST", 1, END, req, b"hello"),
            valid("REQUEST, every field", "§4", "REQUEST", 3, 0, req_full, b'{"prompt":"hi"}'),
            valid("REQUEST with an empty payload", "§3.8", "REQUEST", 2, 0, fields("REQUEST", model="m")),
            valid(
                "newer sender: one extra trailing field",
                "§4.2",
                "REQUEST",
                1,
                END,
                fields("REQUEST", model="echo"),
                meta_bytes=mp([*fields("REQUEST", model="echo").values(), "x"]),
                canonical=False,
            ),
            valid(
                "older sender: the 14 fields before `filter`",
                "§4.2",
                "REQUEST",
                1,
                END,
                fields("REQUEST", model="echo", tenant="t1"),
                meta_bytes=mp(list(fields("REQUEST", model="echo", tenant="t1").values())[:14]),
                canonical=False,
            ),
            invalid("REQUEST without metadata (model required)", "§4", raw(0x10, 1), "BAD_META"),
            invalid(
                "REQUEST filter outside its value set",
                "§4.1",
                raw(0x10, 1, meta=mp([*list(fields("REQUEST", model="m").values())[:14], "strict"])),
                "BAD_META",
            ),
            invalid("REQUEST model is an int", "§4", raw(0x10, 1, meta=mp([5])), "BAD_META"),
            invalid(
                "REQUEST priority out of range",
                "§4",
                raw(0x10, 1, meta=mp(["m", 0, "", {}, False, "", 200])),
                "BAD_META",
            ),
            invalid("REQUEST truncated in its metadata", "§2.3", raw(0x10, 1, meta=mp(["echo"]))[:-4], "TRUNCATED"),
            invalid(
                "REQUEST with good metadata cut inside its payload",
                "§2.3",
                raw(0x10, 1, meta=mp(["echo"]), payload=b"hello")[:-6],
                "TRUNCATED",
            ),
            invalid(
                "REQUEST with bad metadata cut inside its payload: BAD_META, checked before the payload",
                "§2.3",
                raw(0x10, 1, meta=mp([5]), payload=b"hello")[:-6],
                "BAD_META",
            ),
            invalid(
                "REQUEST with bad metadata cut inside a payload of inline_max bytes: BAD_META too",
                "§2.3",
                (HEAD.pack(1, 0x10, 0, 1, 1, 16 * 1024) + b"\xc1" + bytes(10)).hex(),
                "BAD_META",
            ),
            invalid(
                "REQUEST without metadata (model required) cut inside its payload",
                "§2.3",
                (HEAD.pack(1, 0x10, 0, 1, 0, 5) + b"he").hex(),
                "BAD_META",
            ),
        ],
        "RESPONSE": [
            valid("RESPONSE head, defaults, 3-byte payload", "§3.9", "RESPONSE", 1, 0, None, b"abc"),
            valid(
                "RESPONSE with FLAG_END",
                "§3.9",
                "RESPONSE",
                2,
                END,
                fields("RESPONSE", content_type="audio/wav", headers={"x-a": "1"}, timing={"wait": 0.0}),
                b"RIFF",
            ),
            valid(
                "RESPONSE headers with a key twice: the last value is kept",
                "§4.1",
                "RESPONSE",
                1,
                0,
                fields("RESPONSE", headers={"x-a": "2"}),
                meta_bytes=b"\x93\xa0\x82" + mp("x-a") + mp("1") + mp("x-a") + mp("2") + b"\x80",
                canonical=False,
            ),
        ],
        "DATA": [
            valid("DATA chunk", "§3.10", "DATA", 5, 0, None, b"\x00\x01\x02\xff"),
            valid("empty DATA with FLAG_END", "§3.10", "DATA", 5, END, None),
            valid("DATA of 16 KiB (in-place receive path)", "§2.4", "DATA", 9, 0, None, bytes(range(256)) * 64),
            invalid(
                "DATA longer than max_payload (header only)",
                "§2.3",
                raw(0x12, 1)[:-16] + (MAX_PAYLOAD + 1).to_bytes(8, "big").hex(),
                "FRAME_SIZE",
            ),
            invalid(
                "DATA with payload length 2^64-1 (header only)", "§2.3", raw(0x12, 1)[:-16] + "ff" * 8, "FRAME_SIZE"
            ),
            invalid("DATA truncated in its payload", "§2.3", raw(0x12, 1, payload=b"abcd")[:-2], "TRUNCATED"),
        ],
        "END": [
            valid("END, defaults (length 0)", "§3.11", "END", 1, 0, None),
            valid("END with timings", "§3.11", "END", 1, 0, fields("END", timing={"work": 38.0, "queue": 0.08})),
            invalid("END with FLAG_END", "§2.2", raw(0x13, 1, END), "BAD_FLAGS"),
        ],
        "ERROR": [
            valid(
                "ERROR no capacity, retry after 250 ms",
                "§3.12",
                "ERROR",
                1,
                0,
                fields("ERROR", code=36, message="no worker for echo", retry_after_ms=250),
            ),
            invalid("ERROR without code", "§4", raw(0x14, 1), "BAD_META"),
        ],
        "CANCEL": [
            valid("CANCEL, defaults (CANCELLED)", "§3.13", "CANCEL", 1, 0, None),
            valid(
                "CANCEL for a content-policy verdict",
                "§3.13",
                "CANCEL",
                4,
                0,
                fields("CANCEL", code=42, message="filter"),
            ),
        ],
        "CHECKPOINT": [
            valid(
                "CHECKPOINT step 3 of a job",
                "§3.14",
                "CHECKPOINT",
                2,
                0,
                fields("CHECKPOINT", seq=3, fence=7, progress=0.3),
                b"\x00state",
            ),
            invalid("CHECKPOINT without seq", "§4", raw(0x16, 2), "BAD_META"),
        ],
    }
    for name, cases in v.items():
        cases.extend(common_invalid(name))
    return v


def header_cases() -> list[dict[str, Any]]:
    end = {"type": "END", "stream_id": 1, "flags": 0, "meta": None, "payload_hex": ""}
    return [
        {"name": "smallest valid frame: END with nothing", "spec": "§2.1", "hex": raw(0x13, 1), "frame": end},
        invalid("version 0", "§2.3", raw(0x13, 1, version=0), "BAD_VERSION"),
        invalid("version 2 (not negotiated)", "§2.3", raw(0x13, 1, version=2), "BAD_VERSION"),
        invalid("unknown type 0x00", "§2.3", raw(0x00), "UNKNOWN_FRAME_TYPE"),
        invalid("unknown type 0x08", "§2.3", raw(0x08), "UNKNOWN_FRAME_TYPE"),
        invalid("unknown type 0xff", "§2.3", raw(0xFF, 1), "UNKNOWN_FRAME_TYPE"),
        invalid("version is checked before type", "§2.3", raw(0xFF, version=9), "BAD_VERSION"),
        invalid(
            "metadata longer than max_meta (header only)",
            "§2.3",
            HEAD.pack(1, 0x10, 0, 1, MAX_META + 1, 0).hex(),
            "FRAME_SIZE",
        ),
        invalid(
            "metadata length 2^32-1 (header only)", "§2.3", HEAD.pack(1, 0x10, 0, 1, 2**32 - 1, 0).hex(), "FRAME_SIZE"
        ),
        invalid("header cut at 10 bytes", "§2.3", raw(0x13, 1)[:20], "TRUNCATED"),
        invalid("header cut at 19 bytes", "§2.3", raw(0x13, 1)[:38], "TRUNCATED"),
    ]


def connection_cases() -> list[dict[str, Any]]:
    """State-dependent cases (SPEC §5, §6): `before` sets up the connection, `hex` is then received."""
    hello = raw(0x01, meta=mp(list(fields("HELLO", role="ingress", credit=8).values())))
    ack = raw(0x02, meta=mp(list(fields("HELLO_ACK", version=1, credit=2).values())))
    acc = [{"recv": hello}, {"send": ack}]  # acceptor after the handshake; the dialer holds 2 credits
    dia = [{"send": hello}, {"recv": ack}]  # dialer after the handshake; the acceptor holds 8 credits
    req = lambda sid, flags=0: raw(0x10, sid, flags, mp(list(fields("REQUEST", model="echo").values())))  # noqa: E731
    credit = lambda n: raw(0x06, meta=mp([n]))  # noqa: E731
    goaway = lambda code, last: raw(0x05, meta=mp(list(fields("GOAWAY", code=code, last_stream_id=last).values())))  # noqa: E731
    frame = lambda t, sid, flags=0, meta=None, payload=b"": {  # noqa: E731
        "type": t,
        "stream_id": sid,
        "flags": flags,
        "meta": meta,
        "payload_hex": payload.hex(),
    }
    c = lambda name, spec, side, before, hexstr, **exp: {  # noqa: E731
        "name": name,
        "spec": spec,
        "connection": {"side": side, "before": before},
        "hex": hexstr,
        **exp,
    }
    rq = fields("REQUEST", model="echo")
    rq_meta = mp(list(rq.values()))
    reset_1 = [{"event": "STREAM_RESET", "stream_id": 1, "code": "STREAM_STATE"}]  # stream 1 reset, connection lives
    return [
        c(
            "HELLO accepted for the application to answer",
            "§6.1",
            "acceptor",
            [],
            hello,
            events=[frame("HELLO", 0, meta=fields("HELLO", role="ingress", credit=8))],
        ),
        c(
            "REQUEST before HELLO",
            "§6.1",
            "acceptor",
            [],
            req(1),
            error="BAD_STATE",
            sends=[{"type": "GOAWAY", "code": "BAD_STATE"}],
        ),
        c("PING before HELLO", "§6.1", "acceptor", [], raw(0x03, payload=bytes(8)), error="BAD_STATE"),
        c(
            "REQUEST announcing a 16 MiB payload before HELLO: refused at its header, no payload waited for",
            "§2.3",
            "acceptor",
            [],
            (HEAD.pack(1, 0x10, 0, 1, len(rq_meta), 16 * 1024 * 1024) + rq_meta).hex(),
            error="BAD_STATE",
            sends=[{"type": "GOAWAY", "code": "BAD_STATE"}],
        ),
        c(
            "HELLO and a REQUEST in one read (pipelined before HELLO_ACK)",
            "§6.1",
            "acceptor",
            [],
            hello + req(1),
            events=[frame("HELLO", 0, meta=fields("HELLO", role="ingress", credit=8))],
            error="BAD_STATE",
        ),
        c(
            "HELLO_ACK and the acceptor's first REQUEST in one read",
            "§6.1",
            "dialer",
            [{"send": hello}],
            ack + req(2, 1),
            events=[
                frame("HELLO_ACK", 0, meta=fields("HELLO_ACK", version=1, credit=2)),
                frame("REQUEST", 2, 1, meta=rq),
            ],
        ),
        c(
            "HELLO with no common version",
            "§6.2",
            "acceptor",
            [],
            raw(0x01, meta=mp(list(fields("HELLO", role="client", min_version=2, max_version=3).values()))),
            error="UNSUPPORTED_VERSION",
            sends=[{"type": "GOAWAY", "code": "UNSUPPORTED_VERSION"}],
        ),
        c("second HELLO", "§6.1", "acceptor", acc, hello, error="BAD_STATE"),
        c("HELLO_ACK before HELLO was sent", "§6.1", "dialer", [], ack, error="BAD_STATE"),
        c(
            "HELLO_ACK choosing a version the dialer did not offer",
            "§6.2",
            "dialer",
            [{"send": hello}],
            raw(0x02, meta=mp(list(fields("HELLO_ACK", version=2).values()))),
            error="UNSUPPORTED_VERSION",
        ),
        c(
            "HELLO refused with GOAWAY",
            "§6.1",
            "dialer",
            [{"send": hello}],
            goaway(11, 0),
            events=[
                frame("GOAWAY", 0, meta=fields("GOAWAY", code=11)),
                {"event": "CONNECTION_TERMINATED", "code": "UNAUTHENTICATED"},
            ],
        ),
        c("REQUEST opens stream 1", "§5", "acceptor", acc, req(1, END), events=[frame("REQUEST", 1, END, rq)]),
        c("REQUEST with the acceptor's parity", "§5.1", "acceptor", acc, req(2), error="BAD_STREAM_ID"),
        c(
            "REQUEST reusing a closed stream id",
            "§5.1",
            "acceptor",
            [*acc, {"recv": req(1, END)}, {"send": raw(0x11, 1, END)}],
            req(1),
            error="BAD_STREAM_ID",
        ),
        c(
            "REQUEST with a lower id than the last",
            "§5.1",
            "acceptor",
            [*acc, {"recv": req(5)}],
            req(3),
            error="BAD_STREAM_ID",
        ),
        c(
            "REQUEST beyond the credit granted",
            "§7",
            "acceptor",
            [*acc, {"recv": req(1)}, {"recv": req(3)}],
            req(5),
            error="CREDIT_VIOLATION",
            sends=[{"type": "GOAWAY", "code": "CREDIT_VIOLATION"}],
        ),
        c("DATA on a stream never opened", "§5.4", "acceptor", acc, raw(0x12, 7, payload=b"x"), error="BAD_STREAM_ID"),
        c(
            "REQUEST on an open stream",
            "§5.2",
            "acceptor",
            [*acc, {"recv": req(1)}],
            req(1),
            events=reset_1,
            sends=[{"type": "ERROR", "code": "STREAM_STATE", "stream_id": 1}, {"type": "CREDIT"}],
        ),
        c(
            "RESPONSE from the opener",
            "§5.2",
            "acceptor",
            [*acc, {"recv": req(1)}],
            raw(0x11, 1),
            events=reset_1,
            sends=[{"type": "ERROR", "code": "STREAM_STATE", "stream_id": 1}, {"type": "CREDIT"}],
        ),
        c(
            "CHECKPOINT from the opener",
            "§5.2",
            "acceptor",
            [*acc, {"recv": req(1)}],
            raw(0x16, 1, meta=mp([1, 0, 0.0])),
            events=reset_1,
        ),
        c(
            "DATA after the opener's END",
            "§5.2",
            "acceptor",
            [*acc, {"recv": req(1, END)}],
            raw(0x12, 1),
            events=reset_1,
        ),
        c(
            "response DATA before the RESPONSE head",
            "§5.2",
            "dialer",
            [*dia, {"send": req(1, END)}],
            raw(0x12, 1, payload=b"x"),
            events=reset_1,
            sends=[{"type": "CANCEL", "code": "STREAM_STATE", "stream_id": 1}],
        ),
        c(
            "END before the RESPONSE head",
            "§5.2",
            "dialer",
            [*dia, {"send": req(1, END)}],
            raw(0x13, 1),
            events=reset_1,
        ),
        c(
            "RESPONSE + END complete a stream",
            "§5",
            "dialer",
            [*dia, {"send": req(1, END)}],
            raw(0x11, 1, 0, b"", b"ok") + raw(0x13, 1),
            events=[frame("RESPONSE", 1, payload=b"ok"), frame("END", 1)],
        ),
        c(
            "late RESPONSE after our CANCEL is dropped",
            "§5.4",
            "dialer",
            [*dia, {"send": req(1)}, {"send": raw(0x15, 1)}],
            raw(0x11, 1, END, b"", b"late"),
            events=[],
        ),
        c(
            "ERROR ends a stream; later DATA is dropped",
            "§5.4",
            "dialer",
            [*dia, {"send": req(1, END)}],
            raw(0x14, 1, meta=mp([39, "worker died", 0, "", {}])) + raw(0x12, 1, payload=b"x"),
            events=[frame("ERROR", 1, meta=fields("ERROR", code=39, message="worker died"))],
        ),
        c(
            "REQUEST crossing our GOAWAY is refused, retryable",
            "§6.5",
            "acceptor",
            [*acc, {"recv": req(1)}, {"send": goaway(0, 1)}],
            req(3),
            events=[],
            sends=[{"type": "ERROR", "code": "SHUTTING_DOWN", "stream_id": 3}],
        ),
        c(
            "GOAWAY resets our streams it did not process",
            "§6.5",
            "dialer",
            [*dia, {"send": req(1)}, {"send": req(3)}],
            goaway(0, 1),
            events=[
                frame("GOAWAY", 0, meta=fields("GOAWAY", last_stream_id=1)),
                {"event": "STREAM_RESET", "stream_id": 3, "code": "SHUTTING_DOWN"},
            ],
        ),
        c(
            "REQUEST after the peer's own GOAWAY",
            "§6.5",
            "acceptor",
            [*acc, {"recv": goaway(0, 0)}],
            req(1),
            error="BAD_STATE",
        ),
        c(
            "REQUEST after both sides sent GOAWAY, ours first: it follows the peer's own GOAWAY",
            "§6.5",
            "acceptor",
            [*acc, {"recv": req(1)}, {"send": goaway(0, 1)}, {"recv": goaway(0, 0)}],
            req(3),
            error="BAD_STATE",
            sends=[{"type": "GOAWAY", "code": "BAD_STATE"}],
        ),
        c(
            "REQUEST after both sides sent GOAWAY, theirs first",
            "§6.5",
            "acceptor",
            [*acc, {"recv": req(1)}, {"recv": goaway(0, 0)}, {"send": goaway(0, 1)}],
            req(3),
            error="BAD_STATE",
        ),
        c(
            "PING is answered with PONG",
            "§6.4",
            "dialer",
            dia,
            raw(0x03, payload=b"12345678"),
            events=[],
            sends=[{"type": "PONG", "payload_hex": b"12345678".hex()}],
        ),
        c(
            "PONG is no event, and nothing answers it",
            "§10",
            "dialer",
            dia,
            raw(0x04, payload=bytes(8)),
            events=[],
            sends=[],
        ),
        c(
            "CREDIT is delivered",
            "§10",
            "dialer",
            dia,
            credit(3),
            events=[frame("CREDIT", 0, meta=fields("CREDIT", grant=3))],
        ),
        c(
            "CREDIT while draining is ignored: no event",
            "§6.5",
            "dialer",
            [*dia, {"recv": goaway(0, 0)}],
            credit(3),
            events=[],
        ),
        c(
            "HEARTBEAT is delivered",
            "§10",
            "acceptor",
            acc,
            raw(0x07, meta=mp(list(fields("HEARTBEAT", healthy=False).values()))),
            events=[frame("HEARTBEAT", 0, meta=fields("HEARTBEAT", healthy=False))],
        ),
        c(
            "CREDIT overflowing the counter",
            "§7",
            "dialer",
            dia,
            raw(0x06, meta=mp([2**31 - 1])),
            error="CREDIT_VIOLATION",
        ),
        c("HELLO_ACK after the handshake", "§6.1", "dialer", dia, ack, error="BAD_STATE"),
        c(
            "HELLO advertising max_payload 7 (no room for PONG)",
            "§8",
            "acceptor",
            [],
            raw(0x01, meta=mp(list(fields("HELLO", role="client", max_payload=7).values()))),
            error="BAD_META",
        ),
        c(
            "HELLO: the version range is checked before the advertised limits",
            "§6.3",
            "acceptor",
            [],
            raw(0x01, meta=mp(list(fields("HELLO", role="client", min_version=2, max_version=2, max_meta=7).values()))),
            error="UNSUPPORTED_VERSION",
        ),
        c(
            "HELLO: the advertised limits are checked before the initial credit",
            "§6.3",
            "acceptor",
            [],
            raw(0x01, meta=mp(list(fields("HELLO", role="client", max_meta=7, credit=2**31).values()))),
            error="BAD_META",
        ),
        c(
            "HELLO granting more than 2^31-1 credits",
            "§7",
            "acceptor",
            [],
            raw(0x01, meta=mp(list(fields("HELLO", role="client", credit=2**31).values()))),
            error="CREDIT_VIOLATION",
        ),
        c(
            "HELLO_ACK: the chosen version is checked before the advertised limits",
            "§6.3",
            "dialer",
            [{"send": hello}],
            raw(0x02, meta=mp(list(fields("HELLO_ACK", version=2, max_payload=7).values()))),
            error="UNSUPPORTED_VERSION",
        ),
        c(
            "HELLO_ACK granting more than 2^31-1 credits",
            "§7",
            "dialer",
            [{"send": hello}],
            raw(0x02, meta=mp(list(fields("HELLO_ACK", version=1, credit=2**32 - 1).values()))),
            error="CREDIT_VIOLATION",
        ),
    ]


def render() -> dict[Path, str]:
    files: dict[Path, dict[str, Any]] = {}
    for name, cases in by_type().items():
        files[OUT / f"{name.lower()}.json"] = {"frame_type": name, "cases": cases}
    files[OUT / "header.json"] = {"frame_type": "*", "cases": header_cases()}
    files[OUT / "connection.json"] = {"frame_type": "*", "cases": connection_cases()}
    return {p: json.dumps(doc, indent=1, ensure_ascii=False) + "\n" for p, doc in files.items()}


def main(argv: list[str]) -> int:
    outputs = render()
    status = write_or_check(outputs, argv, OUT.parent.parent, "python protocol/make_vectors.py")
    if "--check" not in argv:
        print(f"{len(outputs)} files, {sum(len(json.loads(t)['cases']) for t in outputs.values())} cases")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
