"""One connection's protocol state, without I/O: bytes and clock readings in, events and buffers out.

Implements SPEC §5 (streams), §6 (connection life cycle), §7 (credits) and the keep-alive of §6.4 on
top of `FrameDecoder` and `encode_frame`. The user (an asyncio adapter, a test, the fuzzer) moves
bytes and arms one timer at `next_deadline()`; it never parses.

Errors (STYLE §2):
- The peer breaks the spec at connection scope: GOAWAY(code) is queued in `data_to_send()`, the
  connection moves to CLOSED and `RemoteProtocolError` is raised; every later call raises it again.
- The peer breaks the spec on one stream: a `StreamReset` event, a CANCEL or ERROR queued for the
  peer, and the connection lives on.
- Our own caller breaks the spec: `LocalProtocolError`, and nothing was queued or changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Final, cast

import msgspec

from casola.wire.credit import CreditWindow
from casola.wire.decoder import FrameDecoder, copy_in
from casola.wire.encoder import encode_frame
from casola.wire.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from casola.wire.events import Buffer, ConnectionTerminated, Event, Frame, PingAcked, StreamReset
from casola.wire.frames import FLAG_END, FRAME_RULES, PROTOCOL_VERSION, SUPPORTED_VERSIONS, FrameType
from casola.wire.lifecycle import FIRST_FRAMES, ConnState, Direction, Kind, Side, kind_of
from casola.wire.lifecycle import TRANSITIONS as LIFECYCLE
from casola.wire.limits import DEFAULT_LIMITS, MAX_CREDIT, MAX_STREAM_ID, Limits
from casola.wire.meta import CancelMeta, CreditMeta, ErrorMeta, GoAwayMeta, HelloAckMeta, HelloMeta
from casola.wire.stream import Sender, StreamState, next_state

__all__ = ["Connection"]

_OPEN: Final = ConnState.OPEN
_STREAM_CLOSED: Final = StreamState.CLOSED
_OPENER, _RESPONDER = Sender.OPENER, Sender.RESPONDER
MIN_ADVERTISED: Final = 1024  # smallest max_meta/max_payload a peer may advertise (SPEC §8)
# Frames whose payload is a piece of a body: one over the peer's limit is sent as several (SPEC §8).
_SPLITTABLE: Final = frozenset({FrameType.REQUEST, FrameType.RESPONSE, FrameType.DATA})


class Connection:
    """The sans-I/O state of one casola connection, seen from one side."""

    _RECEIVERS: ClassVar[dict[FrameType, Callable[[Connection, Frame, list[Event]], None]]]

    def __init__(
        self,
        side: Side,
        now: float,
        limits: Limits = DEFAULT_LIMITS,
        *,
        auto_credit: bool = True,
        in_memory: bool = False,
    ) -> None:
        """Args:
        side: DIALER if we opened the TCP connection (we send HELLO), else ACCEPTOR.
        now: the current clock reading, seconds (monotonic; any origin).
        limits: our receive limits and timers.
        auto_credit: re-grant stream credits as streams close (ingress/queue links). A worker
            passes False and calls `grant()` as slots free.
        in_memory: both ends live in one process (the in-memory link): `data_to_send()` yields
            the `Frame` objects themselves, and the peer takes them with `receive_frames()`. The
            state machines, credits and payload limits run exactly as for bytes; only the codec
            (exercised by every socket and by the vectors) is skipped, and payloads are not copied.
        """
        self.side = side
        self.limits = limits
        self.state = ConnState.IDLE
        self.version = PROTOCOL_VERSION
        self.peer_hello: Frame | None = None  # the HELLO or HELLO_ACK the peer sent
        self.rtt: float | None = None  # seconds, from the last answered PING
        self.send_credit = 0  # streams we may still open
        # SPEC §6.1: until the handshake, an acceptor takes only HELLO or GOAWAY, a dialer only
        # HELLO_ACK or GOAWAY; the decoder refuses anything else at its header (§2.3 check 7).
        first, opens_on = FIRST_FRAMES[side]
        self._decoder = FrameDecoder(limits, expect=first, opens_on=opens_on)
        self._rx_credit = CreditWindow(auto=auto_credit)
        self._out: list[Buffer | Frame] = []
        self._in_memory = in_memory
        self._streams: dict[int, StreamState] = {}
        self._peer_open = 0  # streams in _streams that the peer opened (CREDIT bound, SPEC §7.1)
        self._local_parity = 1 if side is Side.DIALER else 0
        self._next_local_id = 1 if side is Side.DIALER else 2
        self._last_peer_id = 0
        self._peer_max_meta = DEFAULT_LIMITS.max_meta
        self._peer_max_payload = DEFAULT_LIMITS.max_payload
        self._versions = (PROTOCOL_VERSION, PROTOCOL_VERSION)
        self._goaway_sent_last: int | None = None  # last_stream_id of the GOAWAY we sent
        self._goaway_received = False  # the peer sent GOAWAY(NO_ERROR): it may open nothing more
        self._now = now
        self._handshake_deadline: float | None = now + limits.handshake_timeout
        self._next_ping: float | None = None
        self._ping_payload: bytes | None = None
        self._ping_sent_at = 0.0
        self._ping_count = 0
        self._error: ProtocolError | None = None

    # -- receiving ---------------------------------------------------------------------------

    def writable(self) -> memoryview:
        """Where the next received bytes must land (`recv_into` target); never empty."""
        return self._decoder.writable()

    def commit(self, n: int, now: float) -> list[Event]:
        """`n` received bytes landed at the start of `writable()`.

        Returns:
            The events these bytes completed, in order.
        Raises:
            RemoteProtocolError: connection-scope violation; GOAWAY is queued and the connection is
                CLOSED. `.events` holds the events completed before the violation.
        """
        if self._error is not None:
            raise _again(self._error)
        self._now = now
        failed: tuple[ErrorCode, str] | None = None
        try:
            frames: list[Frame] = self._decoder.commit(n)
        except RemoteProtocolError as exc:  # kept as data: a local holding the exception is a cycle
            frames, failed = exc.events, (exc.code, exc.message)
        return self._receive(frames, failed)

    def receive_frames(self, frames: list[Frame], now: float) -> list[Event]:
        """In-memory link: frames from the peer's `data_to_send()`, already objects.

        Raises:
            RemoteProtocolError: as `commit()`.
        """
        if self._error is not None:
            raise _again(self._error)
        self._now = now
        return self._receive(frames, None)

    def _receive(self, frames: list[Frame], failed: tuple[ErrorCode, str] | None) -> list[Event]:
        """Handle decoded frames; `failed`: the decoder's error after them. Raises the first error."""
        events: list[Event] = []
        try:
            for frame in frames:
                self._RECEIVERS[frame.type](self, frame, events)
        except RemoteProtocolError as exc:
            failed = (exc.code, exc.message)
        if failed is not None:
            self._fail_receive(*failed, events)
        return events

    def _fail_receive(self, code: ErrorCode, message: str, events: list[Event]) -> None:
        """Terminate and raise. The exception lives in no frame's locals: a frame holding the
        exception it raised is a cycle (frame -> exception -> traceback -> frame) that would keep
        this connection and its buffers alive until the next full collection."""
        err = RemoteProtocolError(code, message)
        err.events = events
        self._terminate(err)
        try:
            raise err
        finally:
            del err

    def receive_data(self, data: Buffer, now: float) -> list[Event]:
        """Copy `data` in through `writable()`/`commit()`; `b""` is EOF.

        Raises:
            RemoteProtocolError: as `commit()`; TRUNCATED if EOF falls inside a frame.
        """
        if not data:
            return self.eof(now)
        return copy_in(data, self.writable, lambda n: self.commit(n, now))

    def eof(self, now: float) -> list[Event]:
        """The peer closed its side of the byte stream.

        Returns:
            `[ConnectionTerminated]` (nothing if the connection had already ended).
        Raises:
            RemoteProtocolError: TRUNCATED when the stream ended inside a frame.
        """
        if self._error is not None:
            raise _again(self._error)
        self._now = now
        try:
            self._decoder.eof()
        except RemoteProtocolError as exc:
            self._terminate(exc)
            raise
        if self.state is ConnState.CLOSED:
            return []
        self.state = ConnState.CLOSED
        self._streams.clear()
        self._peer_open = 0
        return [ConnectionTerminated(ErrorCode.NO_ERROR, "peer closed the connection", remote=True)]

    # -- sending -----------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Queue one frame for the peer. A REQUEST, RESPONSE or DATA whose payload is over the peer's
        advertised `max_payload` leaves as several frames (`_send_split`): a body of any size may
        be sent in one call, whatever the peer accepts per frame.

        Raises:
            LocalProtocolError: the frame is not allowed now (state, credit, ids, limits). Nothing
                was queued and no state changed.
        """
        if self._error is not None or self.state is ConnState.CLOSED:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "connection is closed")
        if len(frame.payload) > self._peer_max_payload and frame.type in _SPLITTABLE:
            self._send_split(frame)
            return
        buffers = self._encode(frame)
        mark = len(self._out)
        if FRAME_RULES[frame.type].on_stream:
            self._send_stream_frame(frame)
        else:
            self._send_connection_frame(frame)
        self._out[mark:mark] = buffers  # before any CREDIT that closing the stream queued

    def _send_split(self, frame: Frame) -> None:
        """A payload over the peer's frame limit (SPEC §8) goes out as the frame with the first piece,
        then DATA frames with the rest (views, no copy); only the last one carries FLAG_END. The
        stream's states move exactly as if the sender had split it (SPEC §5)."""
        view = memoryview(frame.payload).cast("B")
        step, n = self._peer_max_payload, len(view)
        end = frame.flags & FLAG_END
        self.send(Frame(frame.type, frame.stream_id, frame.meta, view[:step], frame.flags & ~FLAG_END))
        for off in range(step, n, step):
            last = off + step >= n
            self.send(Frame(FrameType.DATA, frame.stream_id, None, view[off : off + step], end if last else 0))

    def data_to_send(self) -> list[Buffer | Frame]:
        """Everything queued since the last call, in order: header blocks and payload objects
        (in-memory mode: the frames)."""
        out, self._out = self._out, []
        return out

    def next_stream_id(self) -> int:
        """The id the next REQUEST we send must carry."""
        return self._next_local_id

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def stream_state(self, stream_id: int) -> StreamState:
        """The stream's state: IDLE if its id was never used, CLOSED once it has ended."""
        state = self._streams.get(stream_id)
        if state is not None:
            return state
        if (stream_id & 1) == self._local_parity:
            return StreamState.CLOSED if stream_id < self._next_local_id else StreamState.IDLE
        return StreamState.CLOSED if stream_id <= self._last_peer_id else StreamState.IDLE

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def stream_ids(self) -> list[int]:
        """The open streams' ids, as a list (ending them while iterating over it is fine)."""
        return list(self._streams)

    @property
    def goaway_sent(self) -> bool:
        """Whether we sent GOAWAY on this connection."""
        return self._goaway_sent_last is not None

    @property
    def peer_max_payload(self) -> int:
        """The largest payload one frame to the peer may carry (its advertised limit, SPEC §8)."""
        return self._peer_max_payload

    def grant(self, n: int) -> None:
        """Let the peer open `n` more streams (a worker calls this as slots free).

        Raises:
            LocalProtocolError: the grant would exceed `limits.max_streams` or the credit counter.
        """
        self.send(Frame(FrameType.CREDIT, meta=CreditMeta(n)))

    def goaway(self, code: int = ErrorCode.NO_ERROR, message: str = "", retry_after_ms: int = 0) -> None:
        """Queue GOAWAY: NO_ERROR drains (streams accepted so far finish), any other code closes."""
        meta = GoAwayMeta(code, self._last_peer_id, message, retry_after_ms)
        self.send(Frame(FrameType.GOAWAY, meta=meta))

    def reset(self, stream_id: int, code: int, message: str = "") -> None:
        """End a stream early: CANCEL if we opened it, ERROR if the peer did.

        Raises:
            LocalProtocolError: the stream is not open.
        """
        if (stream_id & 1) == self._local_parity:
            self.send(Frame(FrameType.CANCEL, stream_id, CancelMeta(code, message)))
        else:
            self.send(Frame(FrameType.ERROR, stream_id, ErrorMeta(code, message)))

    def set_ping_timeout(self, seconds: float) -> None:
        """Change `limits.ping_timeout` (SPEC §6.4) for this connection: a role that learns who the
        peer is in its HELLO applies its own (a queue node: `worker_ping_timeout` for workers).

        Raises:
            ValueError: `seconds` is not positive.
        """
        if not seconds > 0:
            raise ValueError(f"ping timeout must be positive, got {seconds}")
        self.limits = msgspec.structs.replace(self.limits, ping_timeout=seconds)

    def ping(self, now: float) -> None:
        """Send a PING now (unless one is outstanding); its PONG yields `PingAcked` and sets `rtt`."""
        if self._ping_payload is not None or self.state not in (_OPEN, ConnState.DRAINING):
            return
        self._ping_count += 1
        payload = self._ping_count.to_bytes(8, "big")
        self._now = now
        self.send(Frame(FrameType.PING, payload=payload))
        self._ping_payload, self._ping_sent_at = payload, now

    # -- timers ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `handle_timer` must next be called (clock of the `now` arguments); None: no timer."""
        if self.state is ConnState.CLOSED:
            return None
        if self._handshake_deadline is not None:
            return self._handshake_deadline
        if self._ping_payload is not None:
            return self._ping_sent_at + self.limits.ping_timeout
        return self._next_ping

    def handle_timer(self, now: float) -> list[Event]:
        """Run what is due at `now`: handshake timeout, PONG timeout, the next keep-alive PING.

        Returns:
            `[ConnectionTerminated(TIMEOUT, remote=False)]` when a timeout ended the connection (a
            GOAWAY(TIMEOUT) is then queued), else nothing.
        """
        self._now = now
        if self.state is ConnState.CLOSED:
            return []
        hs = self._handshake_deadline
        if hs is not None and now >= hs:
            return self._time_out("handshake not completed in time")
        if self._ping_payload is not None and now >= self._ping_sent_at + self.limits.ping_timeout:
            return self._time_out("no PONG in time")
        if self._next_ping is not None and now >= self._next_ping:
            self.ping(now)
            self._next_ping = now + self.limits.ping_interval
        return []

    # -- internals: receive handlers (one per frame type) -------------------------------------

    def _on_stream(self, frame: Frame, events: list[Event]) -> None:
        if self.state is not _OPEN and self.state is not ConnState.DRAINING:
            self._check_lifecycle(Direction.RECV, Kind.STREAM, frame)  # raises BAD_STATE
        sid = frame.stream_id
        state = self._streams.get(sid)
        peer_opened = (sid & 1) != self._local_parity
        if state is None:
            if frame.type is FrameType.REQUEST:
                self._on_new_stream(frame, peer_opened, events)
                return
            if (sid <= self._last_peer_id) if peer_opened else (sid < self._next_local_id):
                return  # late frame of a stream that has closed (SPEC §5.4): dropped
            raise RemoteProtocolError(ErrorCode.BAD_STREAM_ID, f"{frame.type.name} on idle stream {sid}")
        sender = _OPENER if peer_opened else _RESPONDER
        new = next_state(state, sender, frame.type, bool(frame.flags & FLAG_END))
        if new is None:
            msg = f"{frame.type.name} from the {sender.value} in state {state.value}"
            self._stream_error(sid, ErrorCode.STREAM_STATE, msg, events)
            return
        events.append(frame)
        if new is _STREAM_CLOSED:
            self._close_stream(sid)
        else:
            self._streams[sid] = new

    def _on_new_stream(self, frame: Frame, peer_opened: bool, events: list[Event]) -> None:
        sid = frame.stream_id
        if not peer_opened or sid <= self._last_peer_id:
            raise RemoteProtocolError(ErrorCode.BAD_STREAM_ID, f"REQUEST may not open stream {sid}")
        if self.state is not _OPEN:
            # SPEC §5.1, §6.5: a REQUEST that crossed our GOAWAY is refused, retryable; one sent after
            # the peer's own GOAWAY (the byte stream is ordered) is BAD_STATE, whoever sent first.
            if self.state is ConnState.DRAINING and self._goaway_sent_last is not None and not self._goaway_received:
                self._refuse_late_stream(sid)
                return
            self._check_lifecycle(Direction.RECV, Kind.NEW_STREAM, frame)
        if not self._rx_credit.spend():
            raise RemoteProtocolError(ErrorCode.CREDIT_VIOLATION, f"stream {sid} opened without credit")
        self._last_peer_id = sid
        self._streams[sid] = next_state(StreamState.IDLE, _OPENER, FrameType.REQUEST, bool(frame.flags & FLAG_END))  # type: ignore[assignment]
        self._peer_open += 1
        events.append(frame)

    def _refuse_late_stream(self, sid: int) -> None:
        self._rx_credit.spend()
        self._last_peer_id = sid
        meta = ErrorMeta(ErrorCode.SHUTTING_DOWN, "stream arrived after GOAWAY; retry elsewhere")
        self._queue(Frame(FrameType.ERROR, sid, meta))

    def _on_hello(self, frame: Frame, events: list[Event]) -> None:
        self._check_lifecycle(Direction.RECV, Kind.HELLO, frame)
        meta = cast(HelloMeta, frame.meta)
        common = [v for v in SUPPORTED_VERSIONS if meta.min_version <= v <= meta.max_version]
        if not common:
            raise RemoteProtocolError(
                ErrorCode.UNSUPPORTED_VERSION, f"peer speaks {meta.min_version}..{meta.max_version}"
            )
        self.version = max(common)
        self._adopt_peer_hello(frame)
        events.append(frame)

    def _on_hello_ack(self, frame: Frame, events: list[Event]) -> None:
        self._check_lifecycle(Direction.RECV, Kind.HELLO_ACK, frame)
        version = frame.meta.version  # type: ignore[union-attr]
        if not self._versions[0] <= version <= self._versions[1] or version not in SUPPORTED_VERSIONS:
            raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"acceptor chose version {version}")
        self.version = self._decoder.version = version
        self._adopt_peer_hello(frame)
        self._handshake_done()
        events.append(frame)

    def _on_goaway(self, frame: Frame, events: list[Event]) -> None:
        self._check_lifecycle(Direction.RECV, kind_of(frame), frame)
        meta = frame.meta
        events.append(frame)
        self.send_credit = 0
        if self.state is ConnState.CLOSED:
            self._streams.clear()
            self._peer_open = 0
            events.append(ConnectionTerminated(meta.code, meta.message, remote=True))  # type: ignore[union-attr]
            return
        self._goaway_received = True
        for sid in [s for s in self._streams if (s & 1) == self._local_parity and s > meta.last_stream_id]:  # type: ignore[union-attr]
            del self._streams[sid]  # the peer will never process these: safe to retry elsewhere
            events.append(StreamReset(sid, ErrorCode.SHUTTING_DOWN, "not processed before GOAWAY", remote=True))

    def _on_ping(self, frame: Frame, events: list[Event]) -> None:
        self._check_lifecycle(Direction.RECV, Kind.CONTROL, frame)
        self._queue(Frame(FrameType.PONG, payload=frame.payload))

    def _on_pong(self, frame: Frame, events: list[Event]) -> None:
        self._check_lifecycle(Direction.RECV, Kind.CONTROL, frame)
        if self._ping_payload is not None and bytes(frame.payload) == self._ping_payload:
            self._ping_payload = None
            self.rtt = self._now - self._ping_sent_at
            events.append(PingAcked(self.rtt))

    def _on_credit(self, frame: Frame, events: list[Event]) -> None:
        self._check_lifecycle(Direction.RECV, Kind.CONTROL, frame)
        if self.state is ConnState.DRAINING:
            return  # no new streams while draining: the grant is moot
        self.send_credit += frame.meta.grant  # type: ignore[union-attr]
        if self.send_credit > MAX_CREDIT:
            raise RemoteProtocolError(ErrorCode.CREDIT_VIOLATION, "credit grant overflows the counter")
        events.append(frame)

    def _on_control(self, frame: Frame, events: list[Event]) -> None:
        self._check_lifecycle(Direction.RECV, Kind.CONTROL, frame)
        events.append(frame)

    # -- internals: sending ------------------------------------------------------------------

    def _send_stream_frame(self, frame: Frame) -> None:
        sid = frame.stream_id
        state = self._streams.get(sid)
        local = (sid & 1) == self._local_parity
        if state is None:
            if frame.type is not FrameType.REQUEST or not local or sid != self._next_local_id:
                raise LocalProtocolError(ErrorCode.STREAM_STATE, f"{frame.type.name} on stream {sid}: not open", sid)
            self._check_lifecycle(Direction.SEND, Kind.NEW_STREAM, frame)
            if self.send_credit <= 0:
                raise LocalProtocolError(ErrorCode.CREDIT_VIOLATION, "no credit to open a stream", sid)
            if sid + 2 > MAX_STREAM_ID:
                raise LocalProtocolError(ErrorCode.BAD_STREAM_ID, "stream ids exhausted: GOAWAY and redial", sid)
            state = StreamState.IDLE
        sender = _OPENER if local else _RESPONDER
        new = next_state(state, sender, frame.type, bool(frame.flags & FLAG_END))
        if new is None:
            raise LocalProtocolError(
                ErrorCode.STREAM_STATE, f"{frame.type.name} as {sender.value} in {state.value}", sid
            )
        if state is StreamState.IDLE:
            self.send_credit -= 1
            self._next_local_id += 2
        if new is _STREAM_CLOSED:
            self._close_stream(sid)
        else:
            self._streams[sid] = new

    def _send_connection_frame(self, frame: Frame) -> None:
        t, meta = frame.type, frame.meta
        new_state = self._check_lifecycle(Direction.SEND, kind_of(frame), frame)
        if t is FrameType.CREDIT:
            if self._rx_credit.outstanding + meta.grant + self._peer_open > self.limits.max_streams:  # type: ignore[union-attr]
                raise LocalProtocolError(ErrorCode.CREDIT_VIOLATION, "grant exceeds limits.max_streams")
            self._rx_credit.granted(meta.grant)  # type: ignore[union-attr]
        elif t is FrameType.HELLO:
            self._versions = (meta.min_version, meta.max_version)  # type: ignore[union-attr]
            self._open_window(meta.credit)  # type: ignore[union-attr]
        elif t is FrameType.HELLO_ACK:
            if meta.version != self.version:  # type: ignore[union-attr]
                raise LocalProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"HELLO_ACK must carry version {self.version}")
            self._open_window(meta.credit)  # type: ignore[union-attr]
            self._decoder.version = self.version
            self._handshake_done()
        elif t is FrameType.GOAWAY:
            self._goaway_sent_last = meta.last_stream_id  # type: ignore[union-attr]
            self.send_credit = 0
            if meta.code != ErrorCode.NO_ERROR:  # type: ignore[union-attr]
                self._streams.clear()
                self._peer_open = 0
        self.state = new_state

    # -- internals: shared ---------------------------------------------------------------------

    def _check_lifecycle(self, direction: Direction, kind: Kind, frame: Frame) -> ConnState:
        """The state after this frame; received frames move the machine at once, sent ones when queued."""
        new = LIFECYCLE.get((self.side, self.state, direction, kind))
        if new is None:
            msg = f"{frame.type.name} not allowed in state {self.state.value} ({self.side.value})"
            if direction is Direction.SEND:
                raise LocalProtocolError(ErrorCode.BAD_STATE, msg)
            raise RemoteProtocolError(ErrorCode.BAD_STATE, msg)
        if direction is Direction.RECV:
            self.state = new
        return new

    def _adopt_peer_hello(self, frame: Frame) -> None:
        meta = cast(HelloMeta | HelloAckMeta, frame.meta)
        # SPEC §8: the core answers PING, errors and credit by itself; tiny limits would make that
        # impossible, so they are refused at the handshake instead of failing later.
        if 0 < meta.max_meta < MIN_ADVERTISED or 0 < meta.max_payload < MIN_ADVERTISED:
            raise RemoteProtocolError(ErrorCode.BAD_META, f"advertised limits below {MIN_ADVERTISED} bytes")
        if meta.credit > MAX_CREDIT:
            raise RemoteProtocolError(ErrorCode.CREDIT_VIOLATION, f"initial credit {meta.credit} > 2^31-1")
        self.peer_hello = frame
        self.send_credit = meta.credit
        self._peer_max_meta = meta.max_meta or DEFAULT_LIMITS.max_meta
        self._peer_max_payload = meta.max_payload or DEFAULT_LIMITS.max_payload

    def _open_window(self, credit: int) -> None:
        if credit > self.limits.max_streams:
            raise LocalProtocolError(ErrorCode.CREDIT_VIOLATION, "initial credit exceeds limits.max_streams")
        self._rx_credit.window = credit
        self._rx_credit.granted(credit)

    def _handshake_done(self) -> None:
        self._handshake_deadline = None
        self._decoder.handshake_done()
        if self.limits.ping_interval > 0:
            self._next_ping = self._now + self.limits.ping_interval

    def _close_stream(self, sid: int) -> None:
        del self._streams[sid]
        if (sid & 1) != self._local_parity:
            self._peer_open -= 1
            grant = self._rx_credit.released()
            if grant and self.state is _OPEN:
                self._rx_credit.granted(grant)
                self._queue(Frame(FrameType.CREDIT, meta=CreditMeta(grant)))

    def _stream_error(self, sid: int, code: ErrorCode, message: str, events: list[Event]) -> None:
        self.reset(sid, code, message)
        events.append(StreamReset(sid, code, message, remote=False))

    def _terminate(self, exc: ProtocolError) -> None:
        """Connection-scope error: queue GOAWAY(code) unless already closed; every later call raises `exc`."""
        if self.state is not ConnState.CLOSED:
            self._queue(Frame(FrameType.GOAWAY, meta=GoAwayMeta(exc.code, self._last_peer_id, exc.message[:200])))
        self.state = ConnState.CLOSED
        self._streams.clear()
        self._peer_open = 0
        self._error = _again(exc)  # a copy without the traceback: no cycle through this connection

    def _time_out(self, message: str) -> list[Event]:
        self._terminate(RemoteProtocolError(ErrorCode.TIMEOUT, message))
        return [ConnectionTerminated(ErrorCode.TIMEOUT, message, remote=False)]

    def _encode(self, frame: Frame) -> list[Buffer | Frame]:
        if self._in_memory:
            if len(frame.payload) > self._peer_max_payload:  # the limit the encoder would enforce
                raise LocalProtocolError(ErrorCode.FRAME_SIZE, f"payload of {len(frame.payload)} bytes over the limit")
            return [frame]
        return encode_frame(frame, self._peer_max_meta, self._peer_max_payload, self.version)  # type: ignore[return-value]

    def _queue(self, frame: Frame) -> None:
        """Queue a frame the core sends by itself (PONG, CREDIT, refusals, GOAWAY): no state checks."""
        self._out += self._encode(frame)


Connection._RECEIVERS = {
    FrameType.HELLO: Connection._on_hello,
    FrameType.HELLO_ACK: Connection._on_hello_ack,
    FrameType.GOAWAY: Connection._on_goaway,
    FrameType.PING: Connection._on_ping,
    FrameType.PONG: Connection._on_pong,
    FrameType.CREDIT: Connection._on_credit,
    FrameType.HEARTBEAT: Connection._on_control,
    **{t: Connection._on_stream for t, rule in FRAME_RULES.items() if rule.on_stream},
}


def _again(err: ProtocolError) -> ProtocolError:
    """A fresh copy of `err` to raise or keep: a raised exception holds its traceback, and through
    its frames the connection, a cycle that keeps closed connections alive until a full collection."""
    return type(err)(err.code, err.message, err.stream_id)
