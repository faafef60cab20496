"""Frames in, buffers out: the sans-I/O frame encoder (SPEC §2, §4).

`encode_frame` returns the header block (fixed header + metadata, one small fresh `bytearray`) and,
when there is one, the payload object itself, never a concatenation: the I/O layer hands both to
`transport.writelines`. The header block is built as in asyncpg's WriteBuffer: reserve the fixed
header, append the metadata with `encode_into`, then backpatch the lengths.
"""

from __future__ import annotations

from typing import Final

import msgspec

from casola.wire.errors import ErrorCode, LocalProtocolError
from casola.wire.events import Buffer, Frame
from casola.wire.frames import ANY, FRAME_RULES, HEAD, HEAD_SIZE, PROTOCOL_VERSION
from casola.wire.limits import DEFAULT_LIMITS
from casola.wire.meta import META_DEFAULTS, META_TYPES

__all__ = ["encode_frame"]

_ENCODER: Final = msgspec.msgpack.Encoder()
_pack_head: Final = HEAD.pack_into


def encode_frame(
    frame: Frame,
    max_meta: int = DEFAULT_LIMITS.max_meta,
    max_payload: int = DEFAULT_LIMITS.max_payload,
    version: int = PROTOCOL_VERSION,
) -> list[Buffer]:
    """Encode one frame for a peer that accepts `max_meta`/`max_payload` bytes.

    Returns:
        `[head]` or `[head, payload]`; the payload is the frame's own object (lent, not copied).
    Raises:
        LocalProtocolError: the frame breaks the framing rules or the peer's limits.
    """
    ftype = frame.type
    rule = FRAME_RULES[ftype]
    head = bytearray(HEAD_SIZE)
    meta = frame.meta
    default = META_DEFAULTS.get(ftype)
    if meta is not None and meta is not default:
        if not rule.meta or type(meta) is not META_TYPES[ftype]:
            raise LocalProtocolError(ErrorCode.BAD_META, f"{ftype.name} cannot carry {type(meta).__name__}")
        _ENCODER.encode_into(meta, head, -1)
    elif meta is None and rule.meta and default is None:
        raise LocalProtocolError(ErrorCode.BAD_META, f"{ftype.name} needs metadata")
    mlen = len(head) - HEAD_SIZE
    payload = frame.payload
    blen = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if mlen > max_meta:
        raise LocalProtocolError(ErrorCode.FRAME_SIZE, f"{ftype.name} metadata {mlen} > {max_meta}")
    if blen > max_payload or (rule.payload != ANY and blen != rule.payload):
        raise LocalProtocolError(ErrorCode.FRAME_SIZE, f"{ftype.name} payload length {blen}")
    if frame.flags & ~rule.flags:
        raise LocalProtocolError(ErrorCode.BAD_FLAGS, f"{ftype.name} flags 0x{frame.flags:04x}")
    if rule.on_stream != (frame.stream_id != 0):
        raise LocalProtocolError(ErrorCode.BAD_STREAM_ID, f"{ftype.name} on stream {frame.stream_id}")
    _pack_head(head, 0, version, ftype, frame.flags, frame.stream_id, mlen, blen)
    return [head, payload] if blen else [head]
