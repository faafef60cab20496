"""A body larger than the peer's advertised frame limit is sent whole and arrives as several frames
(SPEC §8: the sender sizes DATA frames to the *receiving* peer's `max_payload`)."""

from __future__ import annotations

import os

import pytest

from casola.wire import (
    FLAG_END,
    Connection,
    Frame,
    FrameType,
    HelloAckMeta,
    HelloMeta,
    LocalProtocolError,
    RequestMeta,
    ResponseMeta,
    Side,
    StreamState,
)
from casola.wire.events import Event

SMALL = 1024  # the smallest max_payload a peer may advertise (SPEC §8)


def _pair(dialer_max: int, acceptor_max: int, in_memory: bool = False) -> tuple[Connection, Connection]:
    d = Connection(Side.DIALER, 0.0, in_memory=in_memory)
    a = Connection(Side.ACCEPTOR, 0.0, in_memory=in_memory)
    d.send(Frame(FrameType.HELLO, meta=HelloMeta("ingress", credit=8, max_payload=dialer_max)))
    _move(d, a)
    a.send(Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(1, credit=8, max_payload=acceptor_max)))
    _move(a, d)
    return d, a


def _move(src: Connection, dst: Connection) -> list[Event]:
    out = src.data_to_send()
    if not out:
        return []
    if all(isinstance(x, Frame) for x in out):
        return dst.receive_frames(out, 0.0)  # type: ignore[arg-type]
    return dst.receive_data(b"".join(bytes(b) for b in out), 0.0)  # type: ignore[arg-type]


def _frames(events: list[Event]) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("size", [SMALL + 1, 3 * SMALL, 5 * SMALL + 7])
def test_a_whole_answer_over_the_limit_arrives_as_response_and_data(size: int, in_memory: bool) -> None:
    dialer, acceptor = _pair(dialer_max=SMALL, acceptor_max=0, in_memory=in_memory)
    body = os.urandom(size)
    dialer.send(Frame(FrameType.REQUEST, 1, RequestMeta("echo"), b"q", FLAG_END))
    _move(dialer, acceptor)
    acceptor.send(Frame(FrameType.RESPONSE, 1, ResponseMeta("x/y"), body, FLAG_END))
    got = _frames(_move(acceptor, dialer))
    assert got[0].type is FrameType.RESPONSE and got[0].meta == ResponseMeta("x/y")
    assert all(f.type is FrameType.DATA for f in got[1:])
    assert all(len(f.payload) <= SMALL for f in got)
    assert [f.end for f in got] == [False] * (len(got) - 1) + [True]  # only the last ends the stream
    assert b"".join(bytes(f.payload) for f in got) == body
    assert len(got) == -(-size // SMALL)
    assert acceptor.stream_state(1) is dialer.stream_state(1) is StreamState.CLOSED


def test_a_request_body_over_the_limit_keeps_its_direction_open_when_not_ended() -> None:
    dialer, acceptor = _pair(dialer_max=0, acceptor_max=SMALL)
    dialer.send(Frame(FrameType.REQUEST, 1, RequestMeta("echo"), os.urandom(2 * SMALL + 1)))
    got = _frames(_move(dialer, acceptor))
    assert [f.type for f in got] == [FrameType.REQUEST, FrameType.DATA, FrameType.DATA]
    assert not any(f.end for f in got)
    assert acceptor.stream_state(1) is StreamState.OPEN
    dialer.send(Frame(FrameType.DATA, 1, None, os.urandom(SMALL * 2), FLAG_END))
    got = _frames(_move(dialer, acceptor))
    assert [f.end for f in got] == [False, True]
    assert acceptor.stream_state(1) is StreamState.REQUEST_DONE


def test_a_split_that_is_not_allowed_queues_nothing() -> None:
    """Splitting changes no rule: a frame refused whole is refused split, and nothing goes out."""
    _, acceptor = _pair(dialer_max=SMALL, acceptor_max=0)
    with pytest.raises(LocalProtocolError):
        acceptor.send(Frame(FrameType.RESPONSE, 1, ResponseMeta(), os.urandom(4 * SMALL), FLAG_END))
    assert acceptor.data_to_send() == []


def test_the_payload_is_not_copied() -> None:
    dialer, acceptor = _pair(dialer_max=SMALL, acceptor_max=0, in_memory=True)
    body = bytearray(os.urandom(3 * SMALL))
    dialer.send(Frame(FrameType.REQUEST, 1, RequestMeta("echo"), b"", FLAG_END))
    _move(dialer, acceptor)
    acceptor.send(Frame(FrameType.RESPONSE, 1, ResponseMeta(), body, FLAG_END))
    pieces = acceptor.data_to_send()
    assert all(isinstance(f, Frame) and isinstance(f.payload, memoryview) for f in pieces)
    assert all(f.payload.obj is body for f in pieces)  # type: ignore[union-attr]  # views of the one buffer
