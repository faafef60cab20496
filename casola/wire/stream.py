"""The stream state machine (SPEC §5), as data.

Invariants:
  Rule 1. A stream is opened by exactly one side, the *opener*, with REQUEST; the other side is the
          *responder*. Who sent a frame (opener or responder) plus its type is the machine's input.
  Rule 2. The opener sends REQUEST, DATA*, END (or FLAG_END) and may CANCEL at any time; the
          responder sends RESPONSE, DATA*, END (or FLAG_END), or ERROR at any time, and CHECKPOINT
          while the stream is open. The two directions are independent until one side finishes
          the stream: the responder's END or ERROR, or the opener's CANCEL, closes it whole.
  Rule 3. Any (state, sender, type) not in TRANSITIONS is illegal. Received, it is the stream error
          STREAM_STATE (the stream is reset, the connection lives); sent, a LocalProtocolError.
"""

from __future__ import annotations

import enum
from typing import Final

from casola.wire.frames import FrameType

__all__ = ["TRANSITIONS", "Sender", "StreamState", "next_state"]


class StreamState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons compared by identity: C-level hash

    IDLE = "idle"  # id not used yet
    OPEN = "open"  # request flowing, no response head yet
    BOTH_OPEN = "both_open"  # request flowing, response flowing
    REQUEST_DONE = "request_done"  # request ended, no response head yet
    RESPONDING = "responding"  # request ended, response flowing
    CLOSED = "closed"


class Sender(enum.Enum):
    __hash__ = object.__hash__  # members are singletons compared by identity: C-level hash

    OPENER = "opener"
    RESPONDER = "responder"


S, OP, RS, F = StreamState, Sender.OPENER, Sender.RESPONDER, FrameType

TRANSITIONS: Final[dict[tuple[StreamState, Sender, FrameType], StreamState]] = {
    (S.IDLE, OP, F.REQUEST): S.OPEN,
    # request flowing, no response yet
    (S.OPEN, OP, F.DATA): S.OPEN,
    (S.OPEN, OP, F.END): S.REQUEST_DONE,
    (S.OPEN, OP, F.CANCEL): S.CLOSED,
    (S.OPEN, RS, F.RESPONSE): S.BOTH_OPEN,
    (S.OPEN, RS, F.ERROR): S.CLOSED,
    (S.OPEN, RS, F.CHECKPOINT): S.OPEN,
    # both directions flowing (full duplex: streaming ASR answers while audio still arrives)
    (S.BOTH_OPEN, OP, F.DATA): S.BOTH_OPEN,
    (S.BOTH_OPEN, OP, F.END): S.RESPONDING,
    (S.BOTH_OPEN, OP, F.CANCEL): S.CLOSED,
    (S.BOTH_OPEN, RS, F.DATA): S.BOTH_OPEN,
    (S.BOTH_OPEN, RS, F.END): S.CLOSED,  # the responder needs no more input; see SPEC §5.3
    (S.BOTH_OPEN, RS, F.ERROR): S.CLOSED,
    (S.BOTH_OPEN, RS, F.CHECKPOINT): S.BOTH_OPEN,
    # request complete, waiting for the response head
    (S.REQUEST_DONE, OP, F.CANCEL): S.CLOSED,
    (S.REQUEST_DONE, RS, F.RESPONSE): S.RESPONDING,
    (S.REQUEST_DONE, RS, F.ERROR): S.CLOSED,
    (S.REQUEST_DONE, RS, F.CHECKPOINT): S.REQUEST_DONE,
    # response flowing
    (S.RESPONDING, OP, F.CANCEL): S.CLOSED,
    (S.RESPONDING, RS, F.DATA): S.RESPONDING,
    (S.RESPONDING, RS, F.END): S.CLOSED,
    (S.RESPONDING, RS, F.ERROR): S.CLOSED,
    (S.RESPONDING, RS, F.CHECKPOINT): S.RESPONDING,
}
del S, OP, RS, F


def next_state(state: StreamState, sender: Sender, ftype: FrameType, end: bool) -> StreamState | None:
    """The state after `sender` sends a frame of `ftype` (with FLAG_END when `end`); None: illegal."""
    new = TRANSITIONS.get((state, sender, ftype))
    if new is not None and end and ftype is not FrameType.END:
        return TRANSITIONS.get((new, sender, FrameType.END))
    return new
