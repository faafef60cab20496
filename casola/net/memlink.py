"""The in-memory link: two `casola.wire.Connection`s in one process, joined without a socket.

`casola up` runs the ingress and the queue node in one process; the hop between them is this link.
It carries the same frames as TCP, through the same state machines: both `Connection`s run in
in-memory mode, so one end's `data_to_send()` yields `Frame` objects and the other end takes them
with `receive_frames()`. Stream states, credits, GOAWAY and payload limits behave exactly as on a
socket; only the byte codec is skipped (it is exercised by every socket hop and by the vectors),
and payloads cross without a copy. Delivery happens on the next loop iteration (never inside the
sender's call), and a bounded backlog drives the sender's `WriteGate` like a socket buffer.
"""

from __future__ import annotations

from typing import Any

from casola.net.link import EventHandler, LinkBase, LostHandler
from casola.net.protocol import WRITE_HIGH, WRITE_LOW
from casola.wire import Connection, Event, Frame, RemoteProtocolError

__all__ = ["MemoryEnd", "memory_pair"]


class MemoryEnd(LinkBase):
    """One end of an in-memory link; `peer` is the other end."""

    peer: MemoryEnd

    def __init__(self, conn: Connection, on_events: EventHandler | None = None, on_lost: LostHandler | None = None):
        super().__init__(conn, on_events, on_lost)
        self.peername = ("memory", 0)
        self._backlog: list[Frame] = []  # written, not yet delivered to the peer
        self._backlog_bytes = 0
        self._scheduled = False

    def _write(self, out: list[Any]) -> None:
        self._backlog += out
        self._backlog_bytes += sum(len(f.payload) for f in out)
        if self._backlog_bytes > WRITE_HIGH:
            self.gate.pause()
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        peer = self.peer
        if self._lost or peer._lost or peer._reading_paused or not self._backlog:
            return
        out, self._backlog, self._backlog_bytes = self._backlog, [], 0
        try:
            events: list[Event] = peer.conn.receive_frames(out, self._loop.time())
        except RemoteProtocolError as exc:
            peer._report(exc)
            peer._deliver(exc.events)
            peer.close()
            return
        if self.gate.paused and self._backlog_bytes <= WRITE_LOW:
            self.gate.resume()
        peer._deliver(events)

    def _shut(self) -> None:
        # Deliver what is queued (a GOAWAY), then both ends see the link end, like a TCP close.
        self._pump()
        if not self.peer._lost:
            self._loop.call_soon(self.peer._lose_by_peer)
        self._lose(None)

    def _abandon(self) -> None:
        self._backlog, self._backlog_bytes = [], 0
        self._shut()

    def _buffered(self) -> int:
        return self._backlog_bytes

    def _lose_by_peer(self) -> None:
        if not self._lost:
            try:
                events = self.conn.eof(self._loop.time())
            except RemoteProtocolError as exc:
                events = exc.events
            if events:
                self.on_events(self, events)
            self._lose(None)

    def _set_reading(self, on: bool) -> None:
        if on:
            self.peer._schedule()


def memory_pair(dialer: Connection, acceptor: Connection) -> tuple[MemoryEnd, MemoryEnd]:
    """Two joined ends; the caller sets `on_events`/`on_lost` on each, then the dialer sends HELLO."""
    a, b = MemoryEnd(dialer), MemoryEnd(acceptor)
    a.peer, b.peer = b, a
    return a, b
