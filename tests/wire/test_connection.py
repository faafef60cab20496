"""Connection behaviour beyond the state tables: credits, keep-alive and RTT, timeouts, drain, buffers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from casola.wire import (
    FLAG_END,
    ConnectionTerminated,
    ConnState,
    ErrorCode,
    Frame,
    FrameType,
    GoAwayMeta,
    HelloMeta,
    Limits,
    LocalProtocolError,
    PingAcked,
    RemoteProtocolError,
    RequestMeta,
    ResponseMeta,
)
from tests.wire.pairs import Pair


def request(pair: Pair, payload: bytes = b"hi", flags: int = FLAG_END) -> int:
    sid = pair.dialer.next_stream_id()
    pair.dialer.send(Frame(FrameType.REQUEST, sid, RequestMeta("echo"), payload, flags))
    pair.deliver(pair.dialer)
    return sid


def answer(pair: Pair, sid: int) -> list[object]:
    pair.acceptor.send(Frame(FrameType.RESPONSE, sid, ResponseMeta(), b"ok", FLAG_END))
    return pair.deliver(pair.acceptor)


def test_request_response_round_trip_and_credit_accounting() -> None:
    pair = Pair(acceptor_credit=4).handshake()
    assert pair.dialer.send_credit == 4
    sid = request(pair)
    assert pair.dialer.send_credit == 3 and pair.acceptor.is_open(sid)
    (resp,) = answer(pair, sid)
    assert resp.type is FrameType.RESPONSE and resp.end
    assert not pair.dialer.is_open(sid) and not pair.acceptor.is_open(sid)


def test_auto_credit_is_regranted_once_half_the_window_is_free() -> None:
    pair = Pair(acceptor_credit=4).handshake()
    sids = [request(pair) for _ in range(4)]
    assert pair.dialer.send_credit == 0
    with pytest.raises(LocalProtocolError) as info:
        request(pair)
    assert info.value.code is ErrorCode.CREDIT_VIOLATION
    assert [e.type for e in answer(pair, sids[0])] == [FrameType.RESPONSE]  # 1 of 4 free: no grant yet
    events = answer(pair, sids[1])
    assert [e.type for e in events] == [FrameType.RESPONSE, FrameType.CREDIT]  # response first, then +2
    assert pair.dialer.send_credit == 2


def test_manual_credit_as_a_worker_grants_it() -> None:
    pair = Pair(dialer_credit=1, auto_credit=False).handshake()
    queue, worker = pair.acceptor, pair.dialer  # the worker dialled; the queue node opens streams
    sid = queue.next_stream_id()
    queue.send(Frame(FrameType.REQUEST, sid, RequestMeta("echo"), b"", FLAG_END))
    pair.deliver(queue)
    worker.send(Frame(FrameType.RESPONSE, sid, None, b"done", FLAG_END))
    pair.deliver(worker)
    assert queue.send_credit == 0  # nothing comes back by itself
    worker.grant(1)
    (credit,) = pair.deliver(worker)
    assert credit.type is FrameType.CREDIT and queue.send_credit == 1


def test_grants_cannot_exceed_max_streams() -> None:
    pair = Pair(limits=Limits(max_streams=4), dialer_credit=4, acceptor_credit=4).handshake()
    with pytest.raises(LocalProtocolError):
        pair.acceptor.grant(1)
    assert pair.acceptor.data_to_send() == []


def test_ping_measures_rtt_and_the_keepalive_timer_sends_pings() -> None:
    pair = Pair(limits=Limits(ping_interval=1.0, ping_timeout=5.0)).handshake()
    assert pair.dialer.next_deadline() == 1.0
    assert pair.dialer.handle_timer(1.0) == []
    pair.now = 1.25
    pair.deliver(pair.dialer)  # PING -> acceptor, which queues the PONG itself
    pair.now = 1.5
    (acked,) = pair.deliver(pair.acceptor)
    assert acked == PingAcked(0.5) and pair.dialer.rtt == 0.5
    assert pair.dialer.next_deadline() == 2.0


def test_no_pong_times_the_connection_out() -> None:
    pair = Pair(limits=Limits(ping_interval=1.0, ping_timeout=5.0)).handshake()
    pair.dialer.handle_timer(1.0)
    pair.dialer.data_to_send()  # the PING is lost
    assert pair.dialer.next_deadline() == 6.0
    (ended,) = pair.dialer.handle_timer(6.0)
    assert ended == ConnectionTerminated(ErrorCode.TIMEOUT, ended.message, remote=False)
    assert pair.dialer.state is ConnState.CLOSED
    (goaway,) = pair.deliver(pair.dialer)[:1]
    assert goaway.type is FrameType.GOAWAY and goaway.meta.code == ErrorCode.TIMEOUT


def test_handshake_timeout() -> None:
    pair = Pair(limits=Limits(handshake_timeout=2.0))
    assert pair.acceptor.next_deadline() == 2.0
    assert pair.acceptor.handle_timer(1.9) == []
    (ended,) = pair.acceptor.handle_timer(2.0)
    assert ended.code == ErrorCode.TIMEOUT


def test_graceful_drain_lets_accepted_streams_finish() -> None:
    pair = Pair().handshake()
    sid = request(pair, flags=0)
    pair.acceptor.goaway()
    (goaway,) = pair.deliver(pair.acceptor)
    assert goaway.meta == GoAwayMeta(ErrorCode.NO_ERROR, sid)
    assert pair.dialer.state is ConnState.DRAINING and pair.dialer.send_credit == 0
    pair.dialer.send(Frame(FrameType.DATA, sid, None, b"more", FLAG_END))  # existing stream goes on
    assert pair.deliver(pair.dialer)[0].payload == b"more"
    with pytest.raises(LocalProtocolError):
        request(pair)  # but no new stream
    assert answer(pair, sid)[0].type is FrameType.RESPONSE


def test_connection_error_queues_goaway_and_every_later_call_raises() -> None:
    pair = Pair().handshake()
    with pytest.raises(RemoteProtocolError) as first:
        pair.acceptor.receive_data(b"\x01\xee" + bytes(18), 0.0)
    assert first.value.code is ErrorCode.UNKNOWN_FRAME_TYPE
    (goaway,) = pair.deliver(pair.acceptor)[:1]
    assert goaway.meta.code == ErrorCode.UNKNOWN_FRAME_TYPE
    with pytest.raises(RemoteProtocolError) as again:
        pair.acceptor.receive_data(b"", 0.0)
    assert (again.value.code, again.value.message) == (first.value.code, first.value.message)  # raised afresh
    with pytest.raises(LocalProtocolError):
        pair.acceptor.goaway()


def test_eof_inside_a_frame_is_truncated_and_clean_eof_terminates() -> None:
    pair = Pair().handshake()
    with pytest.raises(RemoteProtocolError) as info:
        pair.acceptor.receive_data(b"\x01\x12\x00", 0.0)
        pair.acceptor.receive_data(b"", 0.0)
    assert info.value.code is ErrorCode.TRUNCATED
    other = Pair().handshake()
    (ended,) = other.dialer.receive_data(b"", 0.0)
    assert isinstance(ended, ConnectionTerminated) and ended.remote


def test_payloads_are_lent_to_the_transport_not_copied() -> None:
    pair = Pair().handshake()
    payload = memoryview(bytearray(b"x" * 100_000))
    sid = pair.dialer.next_stream_id()
    pair.dialer.send(Frame(FrameType.REQUEST, sid, RequestMeta("echo"), payload, FLAG_END))
    head, body = pair.dialer.data_to_send()
    assert body is payload and len(head) < 100


def test_large_payload_reaches_the_peer_in_its_own_buffer() -> None:
    pair = Pair().handshake()
    payload = bytes(range(256)) * 4096
    sid = request(pair, b"", 0)
    pair.dialer.send(Frame(FrameType.DATA, sid, None, payload, FLAG_END))
    data = b"".join(bytes(b) for b in pair.dialer.data_to_send())
    events = []
    for i in range(0, len(data), 65536):  # socket-sized reads
        events += pair.acceptor.receive_data(data[i : i + 65536], 0.0)
    (frame,) = events
    assert isinstance(frame.payload, memoryview) and frame.payload == payload


def test_refusing_a_hello_with_goaway() -> None:
    pair = Pair()
    pair.dialer.send(Frame(FrameType.HELLO, meta=HelloMeta("worker")))
    pair.deliver(pair.dialer)
    pair.acceptor.goaway(ErrorCode.FORBIDDEN_ROLE, "user keys cannot register workers")
    events = pair.deliver(pair.acceptor)
    assert events[-1] == ConnectionTerminated(ErrorCode.FORBIDDEN_ROLE, "user keys cannot register workers")
    assert pair.dialer.state is ConnState.CLOSED and pair.acceptor.state is ConnState.CLOSED


def test_wire_imports_no_io_modules() -> None:
    code = (
        "import sys, casola.wire;"
        "bad = {'asyncio', 'socket', 'selectors', 'uvloop', 'ssl', 'threading', 'select'} & set(sys.modules);"
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
