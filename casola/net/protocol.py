"""The asyncio adapter around `casola.wire.Connection`: moves bytes, arms one timer, never parses.

`FrameProtocol` is an `asyncio.BufferedProtocol`: the event loop receives straight into
`Connection.writable()` (the shared receive buffer, or a large payload's own buffer), then
`buffer_updated` commits and hands the events to the role's `on_events` callback. Outbound buffers go
out with `transport.writelines` (header blocks and payload views, never joined).

Flow control (STYLE §6): explicit write-buffer limits and a `WriteGate` for writers; read pausing is
offered to the role (`pause_reading`/`resume_reading`, idempotent); credits live in the core.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from casola.net.errors import ConnectionLost
from casola.net.gate import WriteGate
from casola.wire import Connection, ConnState, Event, Frame, RemoteProtocolError

__all__ = ["FrameProtocol"]

# Write buffer marks. asyncio defaults to 64 KiB/16 KiB, uvloop to 64 KiB/16 *bytes*; set both
# explicitly. 1 MiB high lets one large payload sit in the buffer without pausing every writer.
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024


class FrameProtocol(asyncio.BufferedProtocol):
    """One TCP connection speaking casola frames."""

    def __init__(
        self,
        conn: Connection,
        on_events: Callable[[FrameProtocol, list[Event]], None],
        on_lost: Callable[[FrameProtocol, BaseException | None], None] | None = None,
    ) -> None:
        self.conn = conn
        self.gate = WriteGate()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_events = on_events
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._reading_paused = False

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.writable()  # never empty; the hint (-1 from asyncio) says nothing

    def buffer_updated(self, nbytes: int) -> None:
        # Must never raise: the transport would treat it as fatal (STYLE §5).
        try:
            events = self.conn.commit(nbytes, self._loop.time())
        except RemoteProtocolError as exc:
            self._deliver(exc.events)
            self._abort(exc)
            return
        self._deliver(events)

    def eof_received(self) -> bool:
        try:
            events = self.conn.eof(self._loop.time())
        except RemoteProtocolError as exc:
            events = exc.events
        self._deliver(events)
        self._flush()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.gate.fail(ConnectionLost(str(exc) if exc else "connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self._on_lost is not None:
            self._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.gate.pause()

    def resume_writing(self) -> None:
        self.gate.resume()

    # -- what roles call -----------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Queue one frame and write it out now. Raises LocalProtocolError (see Connection.send)."""
        self.conn.send(frame)
        self._flush()

    def flush(self) -> None:
        """Write whatever the core queued (after calls that queue frames directly on `conn`)."""
        self._flush()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high mark. Raises ConnectionLost."""
        await self.gate.wait()

    def pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        self._flush()
        if self._transport is not None:
            self._transport.close()

    # -- internals -------------------------------------------------------------------------------

    def _deliver(self, events: list[Event]) -> None:
        if events:
            self._on_events(self, events)
        if self.conn.state is ConnState.CLOSED:
            self.close()  # flushes the GOAWAY the core may have queued
        else:
            self._flush()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)
        self._arm_timer()

    def _arm_timer(self) -> None:
        at = self.conn.next_deadline()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._deliver(self.conn.handle_timer(self._loop.time()))

    def _abort(self, exc: BaseException) -> None:
        self._flush()  # the GOAWAY the core queued
        if self._transport is not None:
            self._transport.close()
