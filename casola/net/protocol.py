"""The TCP link: an `asyncio.BufferedProtocol` around `casola.wire.Connection` that never parses.

The event loop receives straight into `Connection.writable()` (the shared receive buffer, or a large
payload's own buffer), then `buffer_updated` commits and hands the events to the role. Outbound
buffers go out with `transport.writelines` (header blocks and payload views, never joined).

Flow control (STYLE §6): explicit write-buffer limits drive the `WriteGate`; read pausing is offered
to the role (idempotent); credits live in the core.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

from casola.net.link import EventHandler, LinkBase, LostHandler
from casola.wire import Connection, RemoteProtocolError

__all__ = ["WRITE_HIGH", "WRITE_LOW", "FrameProtocol"]

# Write buffer marks. asyncio defaults to 64 KiB/16 KiB, uvloop to 64 KiB/16 *bytes*; set both
# explicitly. 1 MiB high lets one large payload sit in the buffer without pausing every writer.
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024
# A closing link whose peer has not taken what is buffered for it within this is aborted: a peer
# that stopped reading (its PONGs stopped too: ping_timeout) must not keep its buffers alive.
CLOSE_LINGER = 2.0


class FrameProtocol(LinkBase, asyncio.BufferedProtocol):
    """One TCP connection speaking casola frames."""

    def __init__(self, conn: Connection, on_events: EventHandler | None = None, on_lost: LostHandler | None = None):
        LinkBase.__init__(self, conn, on_events, on_lost)
        self._transport: asyncio.Transport | None = None

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peername = transport.get_extra_info("peername")
        self._transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.writable()  # never empty; the hint (-1 from asyncio) says nothing

    def buffer_updated(self, nbytes: int) -> None:
        # Must never raise: the transport would treat it as fatal (STYLE §5).
        try:
            events = self.conn.commit(nbytes, self._loop.time())
        except RemoteProtocolError as exc:
            self._report(exc)
            self._deliver(exc.events)
            self.close()  # flushes the GOAWAY the core queued
            return
        self._deliver(events)

    def eof_received(self) -> bool:
        try:
            events = self.conn.eof(self._loop.time())
        except RemoteProtocolError as exc:
            events = exc.events
        self._deliver(events)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc)

    def pause_writing(self) -> None:
        self.gate.pause()

    def resume_writing(self) -> None:
        self.gate.resume()

    # -- LinkBase --------------------------------------------------------------------------------

    def _write(self, out: list[Any]) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            t.writelines(out)

    def _shut(self) -> None:
        t = self._transport
        if t is not None:
            t.close()  # writes what is buffered (a GOAWAY), then closes...
            if t.get_write_buffer_size():  # ...unless the peer does not read: then it goes anyway
                self._loop.call_later(CLOSE_LINGER, t.abort)

    def _abandon(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _buffered(self) -> int:
        t = self._transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()

    def _set_reading(self, on: bool) -> None:
        if self._transport is not None and not self._transport.is_closing():
            if on:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()
