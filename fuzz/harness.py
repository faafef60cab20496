"""Pure fuzz targets, shared by the atheris entry points and the pytest replay (STYLE §7).

Each target feeds one input twice, whole and one byte at a time, and checks:
  1. the only exception that escapes is RemoteProtocolError;
  2. both feeds give equal events (payload views compared as bytes), the same error code, and,
     for the connection, the same bytes queued for the peer.
"""

from __future__ import annotations

from typing import Any

from casola.wire import (
    DEFAULT_LIMITS,
    Connection,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    HelloAckMeta,
    HelloMeta,
    Limits,
    RemoteProtocolError,
    Side,
    encode_frame,
)

__all__ = ["decode_chunks", "fuzz_connection", "fuzz_decoder", "normalize"]


def normalize(events: list[Any]) -> list[Any]:
    """Comparable form: payload views become bytes (h11's normalize_data_events)."""
    return [
        Frame(e.type, e.stream_id, e.meta, bytes(e.payload), e.flags) if isinstance(e, Frame) else e for e in events
    ]


def decode_chunks(chunks: list[bytes], limits: Limits = DEFAULT_LIMITS) -> tuple[list[Any], ErrorCode | None]:
    """Frames (normalized) and the error code, if any, when bytes arrive in `chunks`, then EOF."""
    dec = FrameDecoder(limits)
    out: list[Any] = []
    try:
        for chunk in chunks:
            out += dec.receive_data(chunk)
        dec.eof()
    except RemoteProtocolError as exc:
        return normalize(out + exc.events), exc.code
    return normalize(out), None


def fuzz_decoder(data: bytes) -> None:
    whole = decode_chunks([data])
    split = decode_chunks([data[i : i + 1] for i in range(len(data))])
    # Compared as text: a float field may carry NaN (a HEARTBEAT's load), and NaN != NaN.
    assert repr(whole) == repr(split), (whole, split)


_HELLO = b"".join(encode_frame(Frame(FrameType.HELLO, meta=HelloMeta("ingress", credit=4))))


def _connection(mode: int) -> Connection:
    """mode 0: fresh acceptor; 1: acceptor after the handshake; 2: dialer after the handshake."""
    if mode == 0:
        return Connection(Side.ACCEPTOR, 0.0)
    if mode == 1:
        conn = Connection(Side.ACCEPTOR, 0.0)
        conn.receive_data(_HELLO, 0.0)
        conn.send(Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(1, credit=4)))
    else:
        conn = Connection(Side.DIALER, 0.0)
        conn.send(Frame(FrameType.HELLO, meta=HelloMeta("ingress", credit=4)))
        ack = b"".join(encode_frame(Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(1, credit=4))))
        conn.receive_data(ack, 0.0)
    conn.data_to_send()
    return conn


def _run_connection(mode: int, chunks: list[bytes]) -> tuple[list[Any], int | None, bytes]:
    conn = _connection(mode)
    out: list[Any] = []
    code = None
    try:
        for chunk in chunks:
            out += conn.receive_data(chunk, 1.0)
        out += conn.receive_data(b"", 2.0)
    except RemoteProtocolError as exc:
        out += exc.events
        code = exc.code
    sent = b"".join(bytes(b) for b in conn.data_to_send())
    return normalize(out), code, sent


def fuzz_connection(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    whole = _run_connection(mode, [body])
    split = _run_connection(mode, [body[i : i + 1] for i in range(len(body))])
    # Compared as text: a float field may carry NaN (a HEARTBEAT's load), and NaN != NaN.
    assert repr(whole) == repr(split), (whole, split)
