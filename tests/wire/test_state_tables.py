"""The stream and connection state tables, checked exhaustively through the real Connection.

Every (state, sender, frame type) and every (side, state, direction, kind) is tried: legal pairs
must move the machine to the state SPEC.md's tables give (§5.2, §6.1, read from the spec's text by
tests/wire/spec.py, never from casola.wire's own tables), all others must be refused (STYLE §7).
"""

from __future__ import annotations

import itertools

import pytest

from casola.wire import (
    FLAG_END,
    CheckpointMeta,
    Connection,
    ConnState,
    ErrorCode,
    ErrorMeta,
    Frame,
    FrameType,
    GoAwayMeta,
    HeartbeatMeta,
    HelloAckMeta,
    HelloMeta,
    LocalProtocolError,
    RemoteProtocolError,
    RequestMeta,
    Side,
    StreamReset,
    StreamState,
    encode_frame,
)
from casola.wire import lifecycle as lc
from casola.wire.frames import FRAME_RULES
from casola.wire.stream import Sender
from tests.wire.pairs import Pair
from tests.wire.spec import LIFECYCLE, STREAM, spec_next_state

O, R = Sender.OPENER, Sender.RESPONDER
STREAM_TYPES = [t for t in FrameType if FRAME_RULES[t].on_stream]
SETUP = {  # how stream 1 (opened by the dialer) reaches each state
    StreamState.IDLE: [],
    StreamState.OPEN: [(O, FrameType.REQUEST, 0)],
    StreamState.BOTH_OPEN: [(O, FrameType.REQUEST, 0), (R, FrameType.RESPONSE, 0)],
    StreamState.REQUEST_DONE: [(O, FrameType.REQUEST, FLAG_END)],
    StreamState.RESPONDING: [(O, FrameType.REQUEST, FLAG_END), (R, FrameType.RESPONSE, 0)],
}
META = {
    FrameType.REQUEST: RequestMeta("echo"),
    FrameType.ERROR: ErrorMeta(ErrorCode.WORKER_FAILED),
    FrameType.CHECKPOINT: CheckpointMeta(1),
}


def stream_frame(ftype: FrameType, flags: int = 0, sid: int = 1) -> Frame:
    return Frame(ftype, sid, META.get(ftype), b"x" if FRAME_RULES[ftype].payload else b"", flags)


def driven(state: StreamState) -> Pair:
    pair = Pair().handshake()
    for sender, ftype, flags in SETUP[state]:
        src = pair.dialer if sender is O else pair.acceptor
        src.send(stream_frame(ftype, flags))
        pair.deliver(src)
    assert pair.dialer.stream_state(1) is state and pair.acceptor.stream_state(1) is state
    return pair


CASES = [
    (state, sender, ftype, flags)
    for state, sender, ftype in itertools.product(StreamState, Sender, STREAM_TYPES)
    for flags in ([0, FLAG_END] if FRAME_RULES[ftype].flags else [0])
    if state is not StreamState.CLOSED  # CLOSED is covered by the "late frame" tests
]


@pytest.mark.parametrize(("state", "sender", "ftype", "flags"), CASES)
def test_stream_send(state: StreamState, sender: Sender, ftype: FrameType, flags: int) -> None:
    pair = driven(state)
    src = pair.dialer if sender is O else pair.acceptor
    expected = spec_next_state(state, sender, ftype, bool(flags))
    if expected is None:
        with pytest.raises(LocalProtocolError):
            src.send(stream_frame(ftype, flags))
        assert src.data_to_send() == []  # refused sends queue nothing
        assert src.stream_state(1) is state
    else:
        src.send(stream_frame(ftype, flags))
        assert src.stream_state(1) is expected


@pytest.mark.parametrize(("state", "sender", "ftype", "flags"), CASES)
def test_stream_receive(state: StreamState, sender: Sender, ftype: FrameType, flags: int) -> None:
    pair = driven(state)
    dst = pair.acceptor if sender is O else pair.dialer
    data = b"".join(bytes(b) for b in encode_frame(stream_frame(ftype, flags)))  # bypasses send() checks
    expected = spec_next_state(state, sender, ftype, bool(flags))
    if expected is None and state is StreamState.IDLE:
        with pytest.raises(RemoteProtocolError) as info:
            dst.receive_data(data, 0.0)
        assert info.value.code is ErrorCode.BAD_STREAM_ID
    elif expected is None:
        events = dst.receive_data(data, 0.0)
        assert events == [StreamReset(1, ErrorCode.STREAM_STATE, events[0].message, remote=False)]
        assert dst.stream_state(1) is StreamState.CLOSED
        reset = FrameType.ERROR if dst is pair.acceptor else FrameType.CANCEL
        assert pair.deliver(dst)[0].type is reset
    else:
        (event,) = dst.receive_data(data, 0.0)
        assert isinstance(event, Frame) and event.type is ftype
        assert dst.stream_state(1) is expected


def test_every_stream_transition_is_exercised() -> None:
    covered = {(s, snd, t) for s, snd, t, _ in CASES}
    assert set(STREAM) <= covered


# -- connection life cycle -----------------------------------------------------------------------

UNREACHABLE = {(Side.DIALER, ConnState.AWAIT_ACCEPT), (Side.ACCEPTOR, ConnState.AWAIT_ACK)}


def conn_in(side: Side, state: ConnState) -> tuple[Connection, Pair]:
    """A connection on `side` in `state`; in OPEN/DRAINING the peer has opened stream 1 or 2."""
    pair = Pair()
    conn = pair.dialer if side is Side.DIALER else pair.acceptor
    if state is ConnState.AWAIT_ACK:
        pair.dialer.send(Frame(FrameType.HELLO, meta=HelloMeta("client", credit=8)))
    elif state is ConnState.AWAIT_ACCEPT:
        pair.dialer.send(Frame(FrameType.HELLO, meta=HelloMeta("client", credit=8)))
        pair.deliver(pair.dialer)
    elif state in (ConnState.OPEN, ConnState.DRAINING, ConnState.CLOSED):
        pair.handshake()
        peer = pair.other(conn)
        peer.send(stream_frame(FrameType.REQUEST, sid=peer.next_stream_id()))
        pair.deliver(peer)
        if state is ConnState.DRAINING:
            conn.receive_data(b"".join(encode_frame(Frame(FrameType.GOAWAY, meta=GoAwayMeta(0, 99)))), 0.0)
        if state is ConnState.CLOSED:
            conn.receive_data(b"", 0.0)
    conn.data_to_send()
    assert conn.state is state
    return conn, pair


def kind_frame(kind: lc.Kind, conn: Connection, direction: lc.Direction) -> Frame:
    peer_sid = 2 if conn.side is Side.DIALER else 1
    return {
        lc.Kind.HELLO: Frame(FrameType.HELLO, meta=HelloMeta("client", credit=8)),
        lc.Kind.HELLO_ACK: Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(1, credit=8)),
        lc.Kind.GOAWAY: Frame(FrameType.GOAWAY, meta=GoAwayMeta(ErrorCode.NO_ERROR, 99)),
        lc.Kind.GOAWAY_ERROR: Frame(FrameType.GOAWAY, meta=GoAwayMeta(ErrorCode.INTERNAL_ERROR)),
        lc.Kind.CONTROL: Frame(FrameType.HEARTBEAT, meta=HeartbeatMeta(active=1)),
        lc.Kind.NEW_STREAM: stream_frame(
            FrameType.REQUEST, sid=conn.next_stream_id() if direction is lc.Direction.SEND else peer_sid + 2
        ),
        lc.Kind.STREAM: stream_frame(
            FrameType.RESPONSE if direction is lc.Direction.SEND else FrameType.DATA, sid=peer_sid
        ),
    }[kind]


LIFECYCLE_CASES = [
    c for c in itertools.product(lc.Side, lc.ConnState, lc.Direction, lc.Kind) if (c[0], c[1]) not in UNREACHABLE
]


@pytest.mark.parametrize(("side", "state", "direction", "kind"), LIFECYCLE_CASES)
def test_lifecycle(side: Side, state: ConnState, direction: lc.Direction, kind: lc.Kind) -> None:
    conn, _ = conn_in(side, state)
    frame = kind_frame(kind, conn, direction)
    expected = LIFECYCLE.get((side, state, direction, kind))
    if direction is lc.Direction.SEND:
        if expected is None:
            with pytest.raises(LocalProtocolError):
                conn.send(frame)
            assert conn.data_to_send() == []
        else:
            conn.send(frame)
    else:
        data = b"".join(bytes(b) for b in encode_frame(frame))
        if expected is None:
            with pytest.raises(RemoteProtocolError) as info:
                conn.receive_data(data, 0.0)
            if state is not ConnState.CLOSED:
                assert info.value.code is ErrorCode.BAD_STATE
        else:
            conn.receive_data(data, 0.0)
    assert conn.state is (expected if expected is not None else conn.state)


def test_unreachable_states_have_no_transitions() -> None:
    assert not [k for k in LIFECYCLE if (k[0], k[1]) in UNREACHABLE]
    assert not [k for k in LIFECYCLE if k[1] is ConnState.CLOSED]
