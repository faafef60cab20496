"""The ingress's raw-frame listener: third-party socket clients and edge proxies speak SPEC.md here.

A client dials, sends HELLO (role `client`, its API key as credential) and opens streams as on any casola
link. Each stream is relayed to a queue node; when the client asked for timings (`trace`), the answer comes
back with the ingress's own stage added to the same timing fields the HTTP surface puts in Server-Timing
(RESPONSE meta at the first byte, END meta totals); otherwise with none. A stream without a well-formed
`request_id` gets one made here; a malformed `traceparent` is dropped. The tenant, the content-filter policy
and the highest priority come from the key, never from the client's metadata; every stream is admitted per
tenant and key like an HTTP request (casola.ingress.admission); a key revoked or expired while the connection
is open ends it (GOAWAY UNAUTHENTICATED) within a second, and no stream opens on it meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from ssl import SSLContext
from time import perf_counter
from typing import TYPE_CHECKING

import msgspec

from casola.auth import SCOPE_RUN, AuthError
from casola.ingress.admission import Refusal, Ticket
from casola.ingress.fields import BadField, field_value
from casola.ingress.jobs import Caller, caller_of
from casola.ingress.requestid import trace_context
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

if TYPE_CHECKING:
    from casola.ingress.server import Ingress

__all__ = ["FrameListener"]

log = logging.getLogger("casola.ingress")

CLIENT_CREDIT = 256  # streams one raw client may have open at once


class _Relay:
    """One client stream and its upstream stream."""

    __slots__ = (
        "client",
        "csid",
        "ing",
        "model",
        "size",
        "t_answer",
        "t_sent",
        "t_start",
        "ticket",
        "trace",
        "up",
        "usid",
    )

    def __init__(
        self, ing: Ingress, client: LinkBase, csid: int, up: LinkBase, model: str, ticket: Ticket, trace: bool
    ) -> None:
        self.ing, self.client, self.csid, self.up, self.model = ing, client, csid, up, model
        self.trace = trace  # the client asked for timings (SPEC §4.3); upstream is always asked
        self.ticket: Ticket | None = ticket  # its place at the ingress; given back by end()
        self.usid = 0
        self.size = 0  # request bytes relayed: bounded by the ingress's max_body, as over HTTP
        self.t_start = self.t_sent = self.t_answer = perf_counter()

    def _ingress_ms(self, now: float) -> float:
        return ((now - self.t_start) - (self.t_answer - self.t_sent)) * 1000

    def on_frame(self, frame: Frame, t: float) -> None:
        ft, meta = frame.type, frame.meta
        if ft is not FrameType.DATA:  # the frames that carry timing get the ingress's own stage
            self.t_answer = t
            assert isinstance(meta, ResponseMeta | EndMeta | ErrorMeta)
            if self.trace:
                timing = {"ingress": self._ingress_ms(perf_counter()), **meta.timing}
                meta = msgspec.structs.replace(meta, timing=timing)
            elif meta.timing:
                meta = msgspec.structs.replace(meta, timing={})
        client = self.client
        client.send_if_open(Frame(ft, self.csid, meta, frame.payload, frame.flags))
        if frame.end or ft is FrameType.ERROR:
            self.end()
        elif client.gate.paused and client.write_buffered > self.ing.unread_max:
            unread = client.write_buffered
            log.warning("frame client %s not reading (%d bytes unread): aborted", client.peername, unread)
            client.abort()  # its streams are cancelled upstream as the link goes (_on_lost)

    def on_reset(self, code: int, message: str) -> None:
        self.client.send_if_open(Frame(FrameType.ERROR, self.csid, ErrorMeta(code, message)))
        self.end()

    def fail(self, exc: BaseException) -> None:
        """Relaying this answer raised (e.g. its metadata is over the client's advertised max_meta):
        this stream ends with an error, the client's other streams go on."""
        self.client.reset_if_open(self.csid, ErrorCode.INTERNAL, f"the answer could not be relayed: {exc}"[:200])
        self.end()

    def cancel(self, message: str) -> None:
        """The client gave up (or went): cancel upstream, end here."""
        if self.usid:
            Upstream.cancel(self.up, self.usid, message)
        self.end()

    def end(self) -> None:
        """Forget the stream and give its place back, once, however it ended."""
        self.client.tag.relays.pop(self.csid, None)
        if self.ticket is not None:
            self.ing.release(self.ticket)
            self.ticket = None


class _Client:
    """One raw client connection: who its key stands for, its open streams, its credential watch."""

    __slots__ = ("caller", "relays", "watch")

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        self.relays: dict[int, _Relay] = {}
        self.watch = 0  # CredentialWatch handle (0: none)


class FrameListener:
    def __init__(self, ing: Ingress) -> None:
        self.ing = ing
        self._links: set[LinkBase] = set()

    async def start(self, host: str, port: int, ssl: SSLContext | None = None) -> asyncio.Server:
        return await serve_tcp(host, port, self.on_hello, ssl=ssl, backlog=self.ing.config.backlog)

    def close_all(self) -> None:
        """The ingress stops: every client hears GOAWAY and SHUTTING_DOWN on its open streams."""
        for link in list(self._links):
            link.shut_down("the ingress is stopping")

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
        caller = caller_of(claims, "") if claims is not None else Caller("", "")  # auth off: no tenant
        client = link.tag = _Client(caller)
        if claims is not None and self.ing.watch is not None:
            client.watch = self.ing.watch.add(claims, lambda err: self._unauthenticated(link, err))
        link.on_events, link.on_lost = self._on_events, self._on_lost
        self._links.add(link)
        ack = HelloAckMeta(link.conn.version, self.ing.config.node_id, "", CLIENT_CREDIT)
        link.send(Frame(FrameType.HELLO_ACK, meta=ack))

    @staticmethod
    def _unauthenticated(link: LinkBase, err: AuthError) -> None:
        """The key went bad while the connection was open (revoked, expired): end it now."""
        log.warning("frame client %s: %s; closing its connection", link.peername, err.message)
        link.terminate(ErrorCode.UNAUTHENTICATED, err.message)

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
                    elif ft is FrameType.CANCEL and (r := relays.get(ev.stream_id)) is not None:
                        r.cancel("the client cancelled")
                elif type(ev) is StreamReset and (r := relays.get(ev.stream_id)) is not None:
                    r.cancel("the client's stream was reset")
            except Exception as exc:  # one stream's failure is that stream's; the client's others go on
                self._stream_failed(link, ev, exc)

    def _stream_failed(self, link: LinkBase, ev: Event, exc: Exception) -> None:
        sid = getattr(ev, "stream_id", 0)
        log.error("client stream %d failed in the ingress; ending that stream only", sid, exc_info=exc)
        if (relay := link.tag.relays.get(sid)) is not None:
            relay.cancel("internal error in the ingress")
        link.reset_if_open(sid, ErrorCode.INTERNAL, "internal error")

    def _open(self, link: LinkBase, frame: Frame) -> None:
        meta = frame.meta
        assert isinstance(meta, RequestMeta)
        ing = self.ing
        client: _Client = link.tag
        caller = client.caller
        up = ing.upstream.pick(caller.region)
        refusal = self._refusal(caller, meta, frame)
        if refusal is None and up is None:
            refusal = ErrorMeta(ErrorCode.NO_CAPACITY, "no queue node is reachable", 1000)
        if refusal is None:
            ticket = ing.admit(caller)
            if isinstance(ticket, Refusal):
                refusal = ErrorMeta(ErrorCode.OVERLOADED, ticket.message, ticket.retry_after_ms)
        if refusal is not None:
            link.send_if_open(Frame(FrameType.ERROR, frame.stream_id, refusal))
            return
        assert up is not None and isinstance(ticket, Ticket)
        # The key's tenant and filter policy overwrite whatever the client sent (it may not pick its own).
        deadline = meta.deadline_ms or ing.config.default_deadline_ms
        rid = ing.request_ids.of(meta.request_id.encode())
        parent, state = trace_context(meta.traceparent.encode(), meta.tracestate.encode())
        wants = meta.trace
        meta = msgspec.structs.replace(
            meta,
            tenant=caller.tenant,
            filter=caller.filter,
            trace=True,
            deadline_ms=deadline,
            request_id=rid,
            traceparent=parent,
            tracestate=state,
        )
        relay = _Relay(ing, link, frame.stream_id, up, meta.model, ticket, wants)
        client.relays[frame.stream_id] = relay
        relay.size = len(frame.payload)
        relay.t_sent = perf_counter()
        relay.usid = ing.upstream.open(up, Frame(FrameType.REQUEST, 0, meta, frame.payload, frame.flags), relay)

    def _refusal(self, caller: Caller, meta: RequestMeta, frame: Frame) -> ErrorMeta | None:
        """Why this REQUEST is refused before it goes upstream, or None."""
        limit = self.ing.config.max_body
        if len(frame.payload) > limit:
            return ErrorMeta(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body exceeds {limit} bytes")
        if (why := caller.priority_refusal(meta.priority)) is not None:
            return ErrorMeta(ErrorCode.PERMISSION_DENIED, why, param="priority")
        if caller.claims is not None and self.ing.verifier is not None:
            try:  # revoked or expired since HELLO: no new stream, before the watch ends the connection
                self.ing.verifier.check(caller.claims, time.time())
            except AuthError as exc:
                return ErrorMeta(ErrorCode.UNAUTHENTICATED, exc.message)
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
            r.client.send_if_open(
                Frame(
                    FrameType.ERROR,
                    r.csid,
                    ErrorMeta(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body exceeds {limit} bytes"),
                )
            )
            r.cancel("the request body is too large")
        elif r.up.conn.is_open(r.usid):
            r.up.send(Frame(frame.type, r.usid, frame.meta, frame.payload, frame.flags))

    def _on_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        self._links.discard(link)
        client: _Client = link.tag
        if client.watch and self.ing.watch is not None:
            self.ing.watch.remove(client.watch)
        for relay in list(client.relays.values()):
            relay.cancel("the client went away")
