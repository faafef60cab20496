"""Frame types, flags, the fixed header and the per-type framing rules (SPEC §2, §3).

The rules table is the one place that says, for each frame type, whether it lives on stream 0 or on
a stream, whether it may carry metadata and a payload, and which flags it may set. The decoder
checks a header against it before waiting for the rest of the frame.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple

__all__ = [
    "ANY",
    "FLAG_END",
    "FRAME_RULES",
    "HEAD",
    "HEAD_SIZE",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "FrameRule",
    "FrameType",
]

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})

# SPEC §2.1: version u8, type u8, flags u16, stream id u32, metadata length u32, payload length u64,
# all big-endian: 20 bytes.
HEAD: Final = struct.Struct("!BBHIIQ")
HEAD_SIZE: Final = HEAD.size


class FrameType(enum.IntEnum):
    # C-level hash: Enum.__hash__ is Python code and frame types key every dispatch table.
    __hash__ = int.__hash__

    # connection frames (stream id 0)
    HELLO = 0x01
    HELLO_ACK = 0x02
    PING = 0x03
    PONG = 0x04
    GOAWAY = 0x05
    CREDIT = 0x06
    HEARTBEAT = 0x07
    # stream frames (stream id != 0)
    REQUEST = 0x10
    RESPONSE = 0x11
    DATA = 0x12
    END = 0x13
    ERROR = 0x14
    CANCEL = 0x15
    CHECKPOINT = 0x16


# SPEC §2.2: the only flag of version 1. On REQUEST, RESPONSE and DATA it means "an END frame
# with default metadata follows", so a small request or answer is one frame, not two.
FLAG_END: Final = 0x0001

ANY: Final = -1  # FrameRule.payload: any length up to Limits.max_payload


class FrameRule(NamedTuple):
    on_stream: bool  # True: stream id must be non-zero; False: must be zero
    meta: bool  # metadata allowed (a zero length always means "all defaults")
    payload: int  # 0: none, ANY, or an exact length
    flags: int  # allowed flag bits


FRAME_RULES: Final[dict[FrameType, FrameRule]] = {
    FrameType.HELLO: FrameRule(False, True, 0, 0),
    FrameType.HELLO_ACK: FrameRule(False, True, 0, 0),
    FrameType.PING: FrameRule(False, False, 8, 0),
    FrameType.PONG: FrameRule(False, False, 8, 0),
    FrameType.GOAWAY: FrameRule(False, True, 0, 0),
    FrameType.CREDIT: FrameRule(False, True, 0, 0),
    FrameType.HEARTBEAT: FrameRule(False, True, 0, 0),
    FrameType.REQUEST: FrameRule(True, True, ANY, FLAG_END),
    FrameType.RESPONSE: FrameRule(True, True, ANY, FLAG_END),
    FrameType.DATA: FrameRule(True, False, ANY, FLAG_END),
    FrameType.END: FrameRule(True, True, 0, 0),
    FrameType.ERROR: FrameRule(True, True, 0, 0),
    FrameType.CANCEL: FrameRule(True, True, 0, 0),
    FrameType.CHECKPOINT: FrameRule(True, True, ANY, 0),
}
