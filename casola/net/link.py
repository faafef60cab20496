"""What every role holds for one peer: a `Link` around a `casola.wire.Connection`.

A link moves the core's outbound buffers to the peer, feeds the peer's bytes to the core, arms the
core's single timer and hands events to the role's `on_events`. Two kinds exist and behave the same:
`FrameProtocol` (a TCP socket) and `MemoryEnd` (one end of an in-process link for `casola up`). The
role never knows which one it holds (DESIGN: the in-memory hop "must not be a second code path").
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

from casola.net.errors import ConnectionLost, RateLimitedLog
from casola.net.gate import WriteGate
from casola.wire import Connection, ConnState, ErrorCode, Event, Frame

__all__ = ["EventHandler", "LinkBase", "LostHandler"]

log = logging.getLogger("casola.net")

EventHandler = Callable[["LinkBase", list[Event]], None]
LostHandler = Callable[["LinkBase", BaseException | None], None]


def _ignore_events(link: LinkBase, events: list[Event]) -> None:
    pass


# Write coalescing. While a batch of received events is being handled, frames sent to any link are
# only queued; the batch's end writes each touched link once. At concurrency 32 one incoming batch
# can dispatch 32 requests: one syscall instead of 32. Nothing waits longer than the batch itself.
# The state is the event loop's (one per loop, never module-global: two loops in one process, as
# tests run them, must not share a batch).
class _Batch:
    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[LinkBase] = []

    def flush(self) -> None:
        dirty = self.dirty
        while dirty:
            link = dirty.pop()
            link._dirty = False
            link._flush()


_BATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batch] = weakref.WeakKeyDictionary()


def _batch_of(loop: asyncio.AbstractEventLoop) -> _Batch:
    batch = _BATCHES.get(loop)
    if batch is None:
        batch = _BATCHES[loop] = _Batch()
    return batch


class LinkBase:
    """The transport-independent half of a link. Subclasses implement `_write`, `_shut` and the
    reading switches; everything a role calls lives here.

    Attributes a role may set: `on_events`, `on_lost` (swapped after the handshake), `tag` (the
    role's own object for this peer, e.g. its registry entry).
    """

    def __init__(self, conn: Connection, on_events: EventHandler | None = None, on_lost: LostHandler | None = None):
        self.conn = conn
        self.gate = WriteGate()
        self.on_events: EventHandler = on_events or _ignore_events
        self.on_lost: LostHandler | None = on_lost
        self.tag: Any = None
        self.peername: Any = None  # (host, port), for logs
        self.error_log: RateLimitedLog | None = None  # accepted links: the listener's log of bad peers
        self._loop = asyncio.get_running_loop()
        self._batch = _batch_of(self._loop)
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._reading_paused = False
        self._lost = False
        self._dirty = False
        self._flush_scheduled = False
        self._shut_after_error = False

    # -- what roles call -----------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        """Handshake done and not closing: new streams may be opened (credit permitting)."""
        return self.conn.state is ConnState.OPEN and not self._lost

    def send(self, frame: Frame) -> None:
        """Queue one frame and write it out now (at the end of the event batch being handled, if
        any). Raises LocalProtocolError (see Connection.send)."""
        self.conn.send(frame)
        self.flush()

    def send_if_open(self, frame: Frame) -> bool:
        """Send a frame on a stream that may have ended meanwhile, e.g. by the peer's CANCEL later
        in the batch being handled (the core has already closed it): then nothing is sent. Returns
        whether it was sent. Raises LocalProtocolError for anything but a closed stream."""
        if not self.conn.is_open(frame.stream_id):
            return False
        self.send(frame)
        return True

    def reset_if_open(self, sid: int, code: int, message: str = "") -> bool:
        """End stream `sid` early (CANCEL if we opened it, ERROR if the peer did) and write it, unless
        it has ended already; returns whether it was open. Raises nothing for a closed stream."""
        if not sid or not self.conn.is_open(sid):
            return False
        self.conn.reset(sid, code, message)
        self.flush()
        return True

    def flush(self) -> None:
        """Write whatever the core queued (after calls that queue frames directly on `conn`)."""
        if self._batch.depth:
            if not self._dirty:
                self._dirty = True
                self._batch.dirty.append(self)
        else:
            self._flush()

    def flush_soon(self) -> None:
        """Write on the next loop iteration: tasks finishing in the same iteration share one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_scheduled = False
        self._flush()

    async def drain(self) -> None:
        """Wait while the peer is not taking our bytes. Raises ConnectionLost."""
        await self.gate.wait()

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._set_reading(False)

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._set_reading(True)

    def terminate(self, code: int, message: str) -> None:
        """End the connection: GOAWAY(`code`) unless it has ended already, then close."""
        if self.is_up or self.conn.state is ConnState.DRAINING:
            self.conn.goaway(code, message[:200])
        self.close()

    def shut_down(self, message: str = "shutting down") -> None:
        """End the connection because this role stops (SPEC §6.5): GOAWAY(NO_ERROR) unless sent
        already, SHUTTING_DOWN (retryable elsewhere) on every stream still open, then close; the
        peer learns why instead of reading a bare EOF."""
        conn = self.conn
        if conn.state is ConnState.OPEN or conn.state is ConnState.DRAINING:
            if not conn.goaway_sent:
                conn.goaway(ErrorCode.NO_ERROR, message[:200])
            for sid in conn.stream_ids():
                conn.reset(sid, ErrorCode.SHUTTING_DOWN, message[:200])
        self.close()

    def close(self) -> None:
        """Flush what is queued (a GOAWAY, say), then close."""
        self._flush()
        self._shut()

    def abort(self) -> None:
        """Drop the connection now, with whatever is buffered for the peer (a peer that stopped
        reading: a graceful close would keep its unread bytes in memory until it reads them)."""
        self._abandon()

    @property
    def write_buffered(self) -> int:
        """Bytes written to the peer that it has not taken yet (the transport's write buffer)."""
        return self._buffered()

    # -- for subclasses --------------------------------------------------------------------------

    def _write(self, out: list[Any]) -> None:
        """Move the core's output to the peer: buffers (TCP) or frames (in-memory link)."""
        raise NotImplementedError

    def _shut(self) -> None:
        raise NotImplementedError

    def _set_reading(self, on: bool) -> None:
        raise NotImplementedError

    def _abandon(self) -> None:
        raise NotImplementedError

    def _buffered(self) -> int:
        raise NotImplementedError

    def _deliver(self, events: list[Event]) -> None:
        batch = self._batch
        if events:
            batch.depth += 1
            try:
                self.on_events(self, events)
            except Exception:  # a role's bug must not become a fatal transport error (STYLE §5)
                log.exception("event handler failed; closing the link to %s", self.peername)
                if self.conn.state is ConnState.OPEN:
                    self.conn.goaway(ErrorCode.INTERNAL_ERROR, "internal error")
                self._shut_after_error = True
            finally:
                batch.depth -= 1
                if not batch.depth:
                    batch.flush()
        if self.conn.state is ConnState.CLOSED or self._shut_after_error:
            self.close()  # flushes the GOAWAY the core may have queued
        else:
            self._flush()

    def _report(self, exc: BaseException) -> None:
        """The peer broke the protocol and the link ends: one line, never a traceback."""
        if self.error_log is not None:
            self.error_log.warning("connection from %s ended: %s", self.peername, str(exc))
        else:
            log.warning("connection to %s ended: %s", self.peername, str(exc))

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self._lost:
            self._write(out)
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

    def _lose(self, exc: BaseException | None) -> None:
        """The transport is gone: release waiters, stop the timer, tell the role once."""
        if self._lost:
            return
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.gate.fail(ConnectionLost(str(exc) if exc else "connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost(self, exc)
