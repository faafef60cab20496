"""The ingress's raw-frame listener: third-party socket clients and edge proxies speak SPEC.md here.

A client dials, sends HELLO (role `client`, its API key as credential) and opens streams as on any
casola link. Each stream is relayed to a queue node; the answer comes back with the ingress's own
stage added to the same timing fields the HTTP surface puts in Server-Timing (RESPONSE meta at the
first byte, END meta totals). The tenant and the content-filter policy come from the key, never
from the client's metadata.
"""

from __future__ import annotations

import asyncio
import logging
from ssl import SSLContext
from time import perf_counter
from typing import TYPE_CHECKING

import msgspec

from casola.auth import SCOPE_RUN, AuthError
from casola.ingress.fields import BadField, field_value
from casola.ingress.jobs import key_filter
from casola.ingress.native import SLOW_CLIENT_MAX
from casola.ingress.upstream import Upstream
from casola.net.handshake import Refused, serve_tcp
from casola.net.link import LinkBase
from casola.wire import (
    EndMeta,
    ErrorCode,
    ErrorMeta,
    Event,
    Frame,
    FrameType,
    HelloAckMeta,
    HelloMeta,
    RequestMeta,
    ResponseMeta,
    StreamReset,
)
from casola.wire.meta import FilterPolicy

if TYPE_CHECKING:
    from casola.ingress.server import Ingress

__all__ = ["FrameListener"]

log = logging.getLogger("casola.ingress")

CLIENT_CREDIT = 256  # streams one raw client may have open at once


class _Relay:
    """One client stream and its upstream stream."""

    __slots__ = ("client", "csid", "ing", "model", "size", "t_answer", "t_sent", "t_start", "up", "usid")

    def __init__(self, ing: Ingress, client: LinkBase, csid: int, up: LinkBase, model: str, t_start: float) -> None:
        self.ing, self.client, self.csid, self.up, self.model = ing, client, csid, up, model
        self.usid = 0
        self.size = 0  # request bytes relayed: bounded by the ingress's max_body, as over HTTP
        self.t_start = self.t_sent = self.t_answer = t_start

    def _ingress_ms(self, now: float) -> float:
        return ((now - self.t_start) - (self.t_answer - self.t_sent)) * 1000

    def on_frame(self, frame: Frame, t: float) -> None:
        ft, meta = frame.type, frame.meta
        if ft is not FrameType.DATA:  # the frames that carry timing get the ingress's own stage
            self.t_answer = t
            assert isinstance(meta, ResponseMeta | EndMeta | ErrorMeta)
            timing = {"ingress": self._ingress_ms(perf_counter()), **meta.timing}
            meta = msgspec.structs.replace(meta, timing=timing)
        client = self.client
        client.send_if_open(Frame(ft, self.csid, meta, frame.payload, frame.flags))
        if frame.end or ft is FrameType.ERROR:
            self._done()
        elif client.gate.paused and client.write_buffered > SLOW_CLIENT_MAX:
            unread = client.write_buffered
            log.warning("frame client %s not reading (%d bytes unread): aborted", client.peername, unread)
            client.abort()  # its streams are cancelled upstream as the link goes (_on_lost)

    def on_reset(self, code: int, message: str) -> None:
        self.client.send_if_open(Frame(FrameType.ERROR, self.csid, ErrorMeta(code, message)))
        self._done()

    def fail(self, exc: BaseException) -> None:
        """Relaying this answer raised (e.g. its metadata is over the client's advertised max_meta):
        this stream ends with an error, the client's other streams go on."""
        if self.client.conn.is_open(self.csid):
            self.client.conn.reset(self.csid, ErrorCode.INTERNAL, f"the answer could not be relayed: {exc}"[:200])
            self.client.flush()
        self._done()

    def _done(self) -> None:
        self.client.tag.relays.pop(self.csid, None)


class _Client:
    """One raw client connection: its key's tenant, region pin and filter policy, and its open streams."""

    __slots__ = ("filter", "region", "relays", "tenant")

    def __init__(self, tenant: str, region: str, filter: FilterPolicy) -> None:
        self.tenant, self.region, self.filter = tenant, region, filter
        self.relays: dict[int, _Relay] = {}


class FrameListener:
    def __init__(self, ing: Ingress) -> None:
        self.ing = ing
        self._links: set[LinkBase] = set()

    async def start(self, host: str, port: int, ssl: SSLContext | None = None) -> asyncio.Server:
        return await serve_tcp(host, port, self.on_hello, ssl=ssl)

    def close_all(self) -> None:
        for link in list(self._links):
            link.close()

    def on_hello(self, link: LinkBase, frame: Frame) -> None:
        hello = frame.meta
        assert isinstance(hello, HelloMeta)
        if hello.role != "client":
            raise Refused(ErrorCode.FORBIDDEN_ROLE, f"role {hello.role!r} may not connect to an ingress")
        try:
            claims = self.ing.authenticate(hello.credential, SCOPE_RUN)
        except AuthError as exc:
            code = ErrorCode.FORBIDDEN_ROLE if exc.status == 403 else ErrorCode.UNAUTHENTICATED
            raise Refused(code, exc.message) from exc
        tenant = claims.tenant if claims is not None else ""
        link.tag = _Client(tenant, claims.region if claims is not None else "", key_filter(claims))
        link.on_events, link.on_lost = self._on_events, self._on_lost
        self._links.add(link)
        ack = HelloAckMeta(link.conn.version, self.ing.config.node_id, "", CLIENT_CREDIT)
        link.send(Frame(FrameType.HELLO_ACK, meta=ack))

    def _on_events(self, link: LinkBase, events: list[Event]) -> None:
        relays = link.tag.relays
        for ev in events:
            try:
                if type(ev) is Frame:
                    ft = ev.type
                    if ft is FrameType.REQUEST:
                        self._open(link, ev)
                    elif ft is FrameType.DATA or ft is FrameType.END:
                        r = relays.get(ev.stream_id)
                        if r is not None:
                            self._relay_body(r, ev)
                    elif ft is FrameType.CANCEL:
                        self._cancel(relays.pop(ev.stream_id, None))
                elif type(ev) is StreamReset:
                    self._cancel(relays.pop(ev.stream_id, None))
            except Exception as exc:  # one stream's failure is that stream's; the client's others go on
                self._stream_failed(link, ev, exc)

    def _stream_failed(self, link: LinkBase, ev: Event, exc: Exception) -> None:
        sid = getattr(ev, "stream_id", 0)
        log.error("client stream %d failed in the ingress; ending that stream only", sid, exc_info=exc)
        relay = link.tag.relays.pop(sid, None)
        self._cancel(relay)
        if sid and link.conn.is_open(sid):
            link.conn.reset(sid, ErrorCode.INTERNAL, "internal error")
            link.flush()

    def _open(self, link: LinkBase, frame: Frame) -> None:
        meta = frame.meta
        assert isinstance(meta, RequestMeta)
        ing = self.ing
        client: _Client = link.tag
        refusal = self._refusal(meta, frame)
        if refusal is not None:
            link.send_if_open(Frame(FrameType.ERROR, frame.stream_id, refusal))
            return
        up = ing.upstream.pick(client.region)
        if up is None:
            err = ErrorMeta(ErrorCode.NO_CAPACITY, "no queue node is reachable or has room", 1000)
            link.send_if_open(Frame(FrameType.ERROR, frame.stream_id, err))
            return
        deadline = meta.deadline_ms or ing.config.default_deadline_ms
        # The key's tenant and filter policy overwrite whatever the client sent (it may not pick its own).
        meta = msgspec.structs.replace(
            meta, tenant=client.tenant, filter=client.filter, trace=True, deadline_ms=deadline
        )
        relay = _Relay(ing, link, frame.stream_id, up, meta.model, perf_counter())
        relay.size = len(frame.payload)
        client.relays[frame.stream_id] = relay
        relay.t_sent = perf_counter()
        relay.usid = ing.upstream.open(up, Frame(FrameType.REQUEST, 0, meta, frame.payload, frame.flags), relay)

    def _refusal(self, meta: RequestMeta, frame: Frame) -> ErrorMeta | None:
        """Why this REQUEST is refused before it goes upstream, or None."""
        limit = self.ing.config.max_body
        if len(frame.payload) > limit:
            return ErrorMeta(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body exceeds {limit} bytes")
        if meta.content_type:
            try:
                field_value(meta.content_type, "content_type")  # it may come back in an HTTP header
            except BadField as exc:
                return ErrorMeta(ErrorCode.BAD_REQUEST, str(exc), param="content_type")
        return None

    def _relay_body(self, r: _Relay, frame: Frame) -> None:
        r.size += len(frame.payload)
        if r.size > self.ing.config.max_body:
            limit = self.ing.config.max_body
            r.on_reset(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body exceeds {limit} bytes")
            self._cancel(r)
        elif r.up.conn.is_open(r.usid):
            r.up.send(Frame(frame.type, r.usid, frame.meta, frame.payload, frame.flags))

    @staticmethod
    def _cancel(relay: _Relay | None) -> None:
        if relay is not None and relay.usid:
            Upstream.cancel(relay.up, relay.usid, "the client cancelled")

    def _on_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        self._links.discard(link)
        relays = link.tag.relays
        for relay in list(relays.values()):
            self._cancel(relay)
        relays.clear()
