"""The connection state machine (SPEC §6), as data.

Invariants:
  Rule 1. The dialer (the side that opened the TCP connection) speaks first: HELLO. The acceptor
          answers HELLO_ACK, or GOAWAY with an error code to refuse. Nothing else may cross before.
  Rule 2. GOAWAY with NO_ERROR starts a drain: no new streams in either direction, streams already
          accepted run to their end. GOAWAY with any other code ends the connection at once.
  Rule 3. Any (side, state, direction, kind) not in TRANSITIONS is illegal: received, the connection
          error BAD_STATE; sent, a LocalProtocolError.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

from casola.wire.errors import ErrorCode
from casola.wire.frames import FrameType

if TYPE_CHECKING:
    from casola.wire.events import Frame

__all__ = ["FIRST_FRAMES", "TRANSITIONS", "ConnState", "Direction", "Kind", "Side", "kind_of"]


class Side(enum.Enum):
    __hash__ = object.__hash__  # members are singletons compared by identity: C-level hash

    DIALER = "dialer"  # opened the TCP connection; opens odd stream ids
    ACCEPTOR = "acceptor"  # accepted it; opens even stream ids


class ConnState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons compared by identity: C-level hash

    IDLE = "idle"  # nothing exchanged
    AWAIT_ACK = "await_ack"  # dialer: HELLO sent
    AWAIT_ACCEPT = "await_accept"  # acceptor: HELLO received, the application decides
    OPEN = "open"
    DRAINING = "draining"  # a GOAWAY(NO_ERROR) crossed: no new streams
    CLOSED = "closed"


class Direction(enum.Enum):
    __hash__ = object.__hash__  # members are singletons compared by identity: C-level hash

    SEND = "send"
    RECV = "recv"


class Kind(enum.Enum):
    __hash__ = object.__hash__  # members are singletons compared by identity: C-level hash

    HELLO = "hello"
    HELLO_ACK = "hello_ack"
    GOAWAY = "goaway"  # NO_ERROR: drain
    GOAWAY_ERROR = "goaway_error"  # any other code: close
    CONTROL = "control"  # PING, PONG, CREDIT, HEARTBEAT
    NEW_STREAM = "new_stream"  # REQUEST opening a stream
    STREAM = "stream"  # any other stream frame


D, A, C, SEND, RECV, K = Side.DIALER, Side.ACCEPTOR, ConnState, Direction.SEND, Direction.RECV, Kind

_handshake: dict[tuple[Side, ConnState, Direction, Kind], ConnState] = {
    (D, C.IDLE, SEND, K.HELLO): C.AWAIT_ACK,
    (D, C.AWAIT_ACK, RECV, K.HELLO_ACK): C.OPEN,
    (D, C.AWAIT_ACK, RECV, K.GOAWAY_ERROR): C.CLOSED,  # refused
    (D, C.AWAIT_ACK, SEND, K.GOAWAY_ERROR): C.CLOSED,  # gave up (timeout)
    (A, C.IDLE, RECV, K.HELLO): C.AWAIT_ACCEPT,
    (A, C.IDLE, SEND, K.GOAWAY_ERROR): C.CLOSED,  # refused before HELLO (overload, timeout)
    (A, C.AWAIT_ACCEPT, SEND, K.HELLO_ACK): C.OPEN,
    (A, C.AWAIT_ACCEPT, SEND, K.GOAWAY_ERROR): C.CLOSED,  # refused (credential, version)
    (A, C.AWAIT_ACCEPT, RECV, K.GOAWAY_ERROR): C.CLOSED,
}

_established: dict[tuple[Side, ConnState, Direction, Kind], ConnState] = {}
for _side in Side:
    for _dir in Direction:
        for _kind in (K.CONTROL, K.STREAM):
            _established[(_side, C.OPEN, _dir, _kind)] = C.OPEN
            _established[(_side, C.DRAINING, _dir, _kind)] = C.DRAINING
        _established[(_side, C.OPEN, _dir, K.NEW_STREAM)] = C.OPEN
        _established[(_side, C.OPEN, _dir, K.GOAWAY)] = C.DRAINING
        _established[(_side, C.DRAINING, _dir, K.GOAWAY)] = C.DRAINING  # the other side's, or a lower id
        _established[(_side, C.OPEN, _dir, K.GOAWAY_ERROR)] = C.CLOSED
        _established[(_side, C.DRAINING, _dir, K.GOAWAY_ERROR)] = C.CLOSED

TRANSITIONS: Final[dict[tuple[Side, ConnState, Direction, Kind], ConnState]] = {**_handshake, **_established}
del D, A, C, SEND, RECV, K, _handshake, _established

_CONTROL: Final = frozenset({FrameType.PING, FrameType.PONG, FrameType.CREDIT, FrameType.HEARTBEAT})

# SPEC §6.1, §2.3 check 7: what each side may receive before the handshake completes, and the frame
# whose arrival completes it for the frames that follow in the same read (the dialer's HELLO_ACK).
FIRST_FRAMES: Final[dict[Side, tuple[frozenset[FrameType], FrameType | None]]] = {
    Side.ACCEPTOR: (frozenset({FrameType.HELLO, FrameType.GOAWAY}), None),
    Side.DIALER: (frozenset({FrameType.HELLO_ACK, FrameType.GOAWAY}), FrameType.HELLO_ACK),
}


def kind_of(frame: Frame) -> Kind:
    """The life-cycle input of a connection frame (new streams are classified by the caller)."""
    t = frame.type
    if t is FrameType.GOAWAY:
        return Kind.GOAWAY if frame.meta.code == ErrorCode.NO_ERROR else Kind.GOAWAY_ERROR  # type: ignore[union-attr]
    if t in _CONTROL:
        return Kind.CONTROL
    if t is FrameType.HELLO:
        return Kind.HELLO
    if t is FrameType.HELLO_ACK:
        return Kind.HELLO_ACK
    return Kind.STREAM
