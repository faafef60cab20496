"""The ingress's side of the queue nodes: persistent links, node choice, and per-stream routing.

The ingress keeps a link to every queue node it knows (redialled with backoff) and sends each request
to the nearest healthy node by measured RTT (PING, SPEC §6.4), or to the region a request or its key
pins (DESIGN "Regions"). A stream's answer frames go to the `Sink` that opened it: the HTTP
surface or a raw-frame client. One link multiplexes every client's requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Protocol

import msgspec

from casola.net.handshake import MemoryDialer, dial_tcp
from casola.net.link import LinkBase
from casola.net.pool import Redialer
from casola.wire import (
    Buffer,
    ConnectionTerminated,
    ErrorCode,
    Event,
    Frame,
    FrameType,
    HelloAckMeta,
    HelloMeta,
    StreamReset,
)
from casola.wire.meta import META_DEFAULTS

__all__ = ["QueueNodeSpec", "Sink", "Upstream"]

log = logging.getLogger("casola.ingress")

_END_META = META_DEFAULTS[FrameType.END]  # the default instance: encoded as metadata length 0


class QueueNodeSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    address: str  # host:port of the queue node's frame listener
    region: str = ""  # "" = learn it from the node's HELLO_ACK


class Sink(Protocol):
    """Receives the answer of one stream. `t` is the loop time the frame arrived. `fail` is told
    when `on_frame` raised: the sink answers its client with an error; the link is not affected."""

    def on_frame(self, frame: Frame, t: float) -> None: ...

    def on_reset(self, code: int, message: str) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class _Node:
    __slots__ = ("redialer", "region", "spec")

    def __init__(self, spec: QueueNodeSpec) -> None:
        self.spec, self.region = spec, spec.region
        self.redialer: Redialer


class Upstream:
    """Links to queue nodes. `pick()` chooses one; `open()` starts a stream on it."""

    def __init__(self, nodes: list[QueueNodeSpec], credential: str, node_id: str = "ingress") -> None:
        self._hello = HelloMeta("ingress", credential=credential, node_id=node_id)
        self._nodes: list[_Node] = []
        for spec in nodes:
            host, _, port = spec.address.rpartition(":")
            self._add(spec, functools.partial(dial_tcp, host, int(port), self._hello, self._on_events, self._on_lost))

    def add_memory(self, dialer: MemoryDialer, region: str = "") -> None:
        """The in-process queue node of `casola up`: same frames, no socket."""
        spec = QueueNodeSpec(address="memory", region=region)
        self._add(spec, lambda: dialer(self._hello, self._on_events, self._on_lost))

    def _add(self, spec: QueueNodeSpec, connect: Callable[[], Awaitable[LinkBase]]) -> None:
        node = _Node(spec)
        node.redialer = Redialer(connect, name=f"ingress->{spec.address}", on_up=lambda link: self._up(node, link))
        self._nodes.append(node)

    def _up(self, node: _Node, link: LinkBase) -> None:
        if link.tag is None:
            link.tag = {}  # stream id -> Sink
        ack = link.conn.peer_hello
        if ack is not None and isinstance(ack.meta, HelloAckMeta) and not node.spec.region:
            node.region = ack.meta.region
        log.info("queue node %s up (region %s)", node.spec.address, node.region)

    async def start(self, wait: float = 0.0) -> None:
        for n in self._nodes:
            n.redialer.start()
        if wait:
            try:
                await asyncio.wait_for(asyncio.gather(*(n.redialer.up.wait() for n in self._nodes)), wait)
            except TimeoutError:
                log.warning("not every queue node is up after %.1f s", wait)

    async def stop(self) -> None:
        await asyncio.gather(*(n.redialer.stop() for n in self._nodes))

    # -- choosing and using a node -------------------------------------------------------------------

    def pick(self, region: str = "") -> LinkBase | None:
        """The up link with stream credit and the lowest RTT (in `region` when pinned), or None."""
        best: LinkBase | None = None
        best_rtt = float("inf")
        for n in self._nodes:
            link = n.redialer.link
            if link is None or not link.is_up or link.conn.send_credit <= 0:
                continue
            if region and n.region != region:
                continue
            rtt = link.conn.rtt if link.conn.rtt is not None else 1.0
            if rtt < best_rtt:
                best, best_rtt = link, rtt
        return best

    def open(self, link: LinkBase, frame: Frame, sink: Sink) -> int:
        """Send REQUEST (`frame`, its stream id is assigned here); answers go to `sink`."""
        sid = link.conn.next_stream_id()
        frame.stream_id = sid
        link.send(frame)
        link.tag[sid] = sink
        return sid

    @staticmethod
    def send_body(link: LinkBase, sid: int, payload: Buffer, end: bool) -> None:
        """More request body; `end` closes the request direction."""
        if not link.conn.is_open(sid):
            return
        if end and not len(payload):
            link.send(Frame(FrameType.END, sid, _END_META))
        else:
            link.send(Frame(FrameType.DATA, sid, None, payload, 1 if end else 0))

    @staticmethod
    def cancel(link: LinkBase, sid: int, message: str = "client went away") -> None:
        link.tag.pop(sid, None)
        link.reset_if_open(sid, ErrorCode.CANCELLED, message)

    def snapshot(self) -> list[dict[str, object]]:
        out = []
        for n in self._nodes:
            link = n.redialer.link
            out.append(
                {
                    "address": n.spec.address,
                    "region": n.region,
                    "up": bool(link is not None and link.is_up),
                    "rtt_ms": None if link is None or link.conn.rtt is None else round(link.conn.rtt * 1000, 3),
                    "in_flight": 0 if link is None else len(link.tag or ()),
                }
            )
        return out

    # -- events from queue nodes ---------------------------------------------------------------------

    def _on_events(self, link: LinkBase, events: list[Event]) -> None:
        sinks: dict[int, Sink] | None = link.tag
        if sinks is None:
            sinks = link.tag = {}
        t = perf_counter()
        for ev in events:
            if type(ev) is Frame:
                sink = sinks.get(ev.stream_id)
                if sink is None:
                    continue
                ft = ev.type
                if ev.end or ft is FrameType.ERROR:
                    del sinks[ev.stream_id]
                try:
                    sink.on_frame(ev, t)
                except Exception as exc:  # one stream's failure is that stream's (DESIGN "Auth and tenancy")
                    self._sink_failed(link, ev.stream_id, sink, exc)
            elif type(ev) is StreamReset:
                sink = sinks.pop(ev.stream_id, None)
                if sink is not None:
                    sink.on_reset(ev.code, ev.message or "stream reset")
            elif type(ev) is ConnectionTerminated:
                self._fail_all(link, f"queue node connection ended: {ev.message}")

    def _sink_failed(self, link: LinkBase, sid: int, sink: Sink, exc: Exception) -> None:
        log.error("answer of stream %d failed in the ingress; that request only is failed", sid, exc_info=exc)
        self.cancel(link, sid, "the ingress failed to relay the answer")
        try:
            sink.fail(exc)
        except Exception:
            log.exception("failing stream %d's client failed too", sid)

    def _on_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        self._fail_all(link, f"queue node connection lost: {exc or 'closed'}")

    @staticmethod
    def _fail_all(link: LinkBase, message: str) -> None:
        sinks: dict[int, Sink] = link.tag or {}
        link.tag = {}
        for sink in sinks.values():
            sink.on_reset(ErrorCode.WORKER_FAILED, message)
