"""SPEC.md's state tables (§5.2, §6.1) as casola enums: the tests' oracle, read from the spec's text
by protocol/spectables.py, never from casola.wire's own tables."""

from __future__ import annotations

from typing import Final

from casola.wire import FrameType
from casola.wire.lifecycle import ConnState, Direction, Kind, Side
from casola.wire.stream import Sender, StreamState
from protocol.spectables import (
    established_transitions,
    handshake_transitions,
    spec_text,
    stream_end_transitions,
    stream_transitions,
)

__all__ = ["LIFECYCLE", "STREAM", "STREAM_WITH_END", "spec_next_state"]

TEXT: Final = spec_text()
_SENDER: Final = {"O": Sender.OPENER, "R": Sender.RESPONDER}
_DIRECTION: Final = {"send": Direction.SEND, "receive": Direction.RECV}
_KIND: Final = {
    "HELLO": Kind.HELLO,
    "HELLO_ACK": Kind.HELLO_ACK,
    "GOAWAY(0)": Kind.GOAWAY,
    "GOAWAY(err)": Kind.GOAWAY_ERROR,
    "CONTROL": Kind.CONTROL,
    "NEW_STREAM": Kind.NEW_STREAM,
    "STREAM": Kind.STREAM,
}

StreamKey = tuple[StreamState, Sender, FrameType]


def _stream(table: dict[tuple[str, str, str], str]) -> dict[StreamKey, StreamState]:
    return {(StreamState[s], _SENDER[o], FrameType[t]): StreamState[n] for (s, o, t), n in table.items()}


STREAM: Final = _stream(stream_transitions(TEXT))  # §5.2, the state table
STREAM_WITH_END: Final = _stream(stream_end_transitions(TEXT))  # §5.2, frames carrying FLAG_END
LIFECYCLE: Final = {
    (Side(side), ConnState[state], _DIRECTION[d], _KIND[k]): ConnState[n]
    for (side, state, d, k), n in {**handshake_transitions(TEXT), **established_transitions(TEXT)}.items()
}  # §6.1, the handshake and established tables


def spec_next_state(state: StreamState, sender: Sender, ftype: FrameType, end: bool) -> StreamState | None:
    """The state §5.2 says a stream moves to; None where the spec says the frame is illegal."""
    if end and ftype is not FrameType.END:
        return STREAM_WITH_END.get((state, sender, ftype))
    return STREAM.get((state, sender, ftype))
