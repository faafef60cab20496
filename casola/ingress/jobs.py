"""Async job operations from the HTTP edge (SPEC §3.8.1): one REQUEST(op=...) to a queue node, its
whole answer collected, then rendered by the API surface that asked.

`JobExchange` is the upstream `Sink` of one operation. It is a `RunExchange` (casola/ingress/native.py)
with another answer path: for `submit` the HTTP request body streams to the queue node exactly as a
native run's does (one frame when small, REQUEST + DATA* + END with backpressure when large); for
`status`, `result` and `cancel` the request body is read and dropped. The answer (RESPONSE + DATA* +
END, at most the ingress's `max_body` bytes) or the ERROR goes to a `Reply`, which renders it for one
surface: the native async API (casola/ingress/asyncapi.py) or fal's queue API (casola/ingress/fal.py).

Authentication is the same as for `POST /v1/run/{model}`: a key with the `run` scope, its tenant on
every operation (the queue node only shows a tenant its own jobs). With auth off every caller is the
tenant `anonymous`. fal's clients send `Authorization: Key <key>`; `Key` is accepted beside `Bearer`.
Job operations go to the queue node picked like any request (pinned region, else the nearest); the
nodes of one region share their job store (PostgreSQL) when there is more than one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol, get_args
from urllib.parse import parse_qsl

from casola.auth import SCOPE_RUN, AuthError, Claims
from casola.ingress.admission import Refusal, Ticket
from casola.ingress.exchange import Exchange
from casola.ingress.native import RunExchange
from casola.ingress.upstream import Upstream
from casola.net.link import LinkBase
from casola.wire import Buffer, ErrorCode, ErrorMeta, Frame, FrameType, RequestMeta, ResponseMeta, Scope, error_info
from casola.wire.meta import FilterPolicy, JobOp, Param

if TYPE_CHECKING:
    from casola.ingress.server import Ingress

__all__ = [
    "ANONYMOUS",
    "COMPLETED",
    "IN_QUEUE",
    "MAX_IDEMPOTENCY_KEY",
    "Caller",
    "JobAnswer",
    "JobExchange",
    "Reply",
    "api_key",
    "authorize",
    "base_url",
    "error_status",
    "header_params",
    "job_id",
    "key_filter",
    "query",
    "start",
]

ANONYMOUS: Final = "anonymous"  # the tenant of every caller when auth is off (the queue node wants one)
IN_QUEUE: Final = "IN_QUEUE"
COMPLETED: Final = "COMPLETED"
# Idempotency keys are opaque client strings kept with the job; 255 is what Stripe allows, and more
# than any UUID or hash a client would pick.
MAX_IDEMPOTENCY_KEY: Final = 255
_KEY: Final = b"key "  # fal's scheme: `Authorization: Key <FAL_KEY>`
_PARAM: Final = b"x-casola-param-"
_JOB_ID: Final = re.compile(rb"[A-Za-z0-9._~-]{1,128}")  # URL-safe as is: ids go back out in URLs
_NO_RESPONSE: Final = ResponseMeta()
_POLICIES: Final[dict[str, FilterPolicy]] = {p: p for p in get_args(FilterPolicy)}
_RESPONSE, _ERROR = FrameType.RESPONSE, FrameType.ERROR

# A job's `error_type` is the `type` column of protocol/errors.toml (e.g. "worker_error") or "cancelled";
# its HTTP status is the one the error table gives that type (the first stream-scope code with it, e.g.
# "server_error" -> INTERNAL's 500, not SHUTTING_DOWN's 503), so a failed job
# reads like the same failure of a sync request. A cancelled job is the exception: the table says 499
# (nginx's "client closed request", about the connection), but whoever asks for the result of a
# cancelled job made a fine request for something that will never exist: 400 (not 409, which fal's
# clients retry). Types this ingress does not know (a newer queue node): 500.
_CANCELLED_STATUS: Final = 400


def _type_statuses() -> dict[str, int]:
    out: dict[str, int] = {}
    stream_first = sorted(ErrorCode, key=lambda c: error_info(c).scope is not Scope.STREAM)
    for code in stream_first:
        if code is ErrorCode.NO_ERROR:
            continue
        info = error_info(code)
        out.setdefault(info.type, info.http)
        out.setdefault(code.name.lower(), info.http)
    out["cancelled"] = _CANCELLED_STATUS
    return out


_TYPE_STATUS: Final = _type_statuses()


def error_status(error_type: str) -> int:
    """The HTTP status for a job that completed with `error_type` (see `_CANCELLED_STATUS`)."""
    return _TYPE_STATUS.get(error_type, 500)


class JobAnswer(NamedTuple):
    """What the queue node answered: the RESPONSE's content type and headers, and the whole body."""

    content_type: str
    headers: Mapping[str, str]
    body: bytes | memoryview


class Reply(Protocol):
    """Renders one job operation's outcome as the HTTP answer of one API surface.

    Each method sends the whole response and returns the HTTP status it sent.
    """

    def answer(self, ans: JobAnswer) -> int:
        """The queue node's RESPONSE. Raises ValueError when the payload is not what the op promises."""
        ...

    def wire_error(self, code: int, message: str, retry_after_ms: int) -> int:
        """An ERROR from the queue node, or the edge's own refusal with a wire code (overload)."""
        ...

    def http_error(self, status: int, message: str, type: str, code: str) -> int:
        """The edge's own refusal (authentication, a bad parameter, no such route)."""
        ...


def base_url(ing: Ingress, ex: Exchange) -> str:
    """`scheme://host` for the URLs a job answer carries: the scheme the listener speaks, the Host the
    client used (clients follow these URLs, fal's SDKs never build their own)."""
    host = ex.header(b"host")
    return ("https://" if ing.tls else "http://") + (host.decode("latin-1") if host else ing.config.http)


def job_id(segment: bytes) -> str | None:
    """A job id from a URL path segment, or None when it cannot be one (answered as not found)."""
    return segment.decode("ascii") if _JOB_ID.fullmatch(segment) else None


def query(ex: Exchange) -> dict[str, str]:
    """The query parameters, percent-decoded; the first value of a repeated name wins."""
    out: dict[str, str] = {}
    if ex.query:
        for k, v in parse_qsl(ex.query.decode("latin-1"), keep_blank_values=True):
            out.setdefault(k, v)
    return out


def header_params(ex: Exchange) -> dict[str, Param]:
    """Model parameters from `X-Casola-Param-<name>` headers, as for a native run."""
    return {
        name[len(_PARAM) :].decode("latin-1"): value.decode("latin-1")
        for name, value in ex.headers
        if name.startswith(_PARAM)
    }


class Caller(NamedTuple):
    """Who a request is for, from its key: what every surface admits and labels it by."""

    tenant: str
    region: str  # "" = any
    filter: FilterPolicy = ""  # the key's content-filter policy (RequestMeta.filter); "" = none, or auth off
    kid: str = ""  # the key's id ("" with auth off)
    max_priority: int = 127  # the highest priority the key may ask for (auth off: any)
    max_inflight: int = 0  # the key's own in-flight limit; 0: the tenant's applies
    claims: Claims | None = None

    def priority_refusal(self, priority: int) -> str | None:
        """Why `priority` is not this caller's to ask for, or None (DESIGN: priority comes from the
        key, not the caller)."""
        if priority > self.max_priority:
            return f"priority {priority} is above this key's maximum ({self.max_priority})"
        return None


def caller_of(claims: Claims, region: str) -> Caller:
    """The caller a verified key stands for (`region`: the request's pin, when the key has none)."""
    return Caller(
        claims.tenant,
        region or claims.region,
        key_filter(claims),
        claims.kid,
        claims.max_priority,
        claims.max_inflight,
        claims,
    )


def key_filter(claims: Claims | None) -> FilterPolicy:
    """The key's content-filter policy as RequestMeta carries it: "" with auth off, and for a value
    this ingress does not know (a key from a newer issuer), so the model's own policy applies."""
    return _POLICIES.get(claims.filter, "") if claims is not None else ""


def api_key(ex: Exchange) -> bytes | None:
    """The Authorization value; fal's `Key <token>` becomes the bare token (the verifier takes
    `Bearer <token>` and a bare token itself)."""
    value = ex.header(b"authorization")
    if value is not None and value[:4].lower() == _KEY:
        return value[4:].strip()
    return value


def authorize(
    ing: Ingress, ex: Exchange, refuse: Callable[[int, str, str, str], object], scope: str = SCOPE_RUN
) -> Caller | None:
    """Authenticate the request's key for `scope` and settle its region (the one check every surface
    makes); None when it was refused through `refuse(status, message, type, code)`.

    Raises:
        Nothing: refusals are answered through `refuse`.
    """
    try:
        claims = ing.authenticate(api_key(ex), scope)
    except AuthError as exc:
        kind = "authentication_error" if exc.status == 401 else "permission_error"
        refuse(exc.status, exc.message, kind, exc.code)
        return None
    region = (ex.header(b"x-region") or b"").decode("latin-1")
    if claims is None:
        return Caller(ANONYMOUS, region)
    if claims.region and region and region != claims.region:
        refuse(403, f"this key is pinned to region {claims.region!r}", "permission_error", "region_pinned")
        return None
    return caller_of(claims, region)


def start(
    ing: Ingress,
    ex: Exchange,
    reply: Reply,
    caller: Caller,
    op: JobOp,
    *,
    model: str = "",
    job_id: str = "",
    params: dict[str, Param] | None = None,
    content_type: str = "",
    priority: int = 0,
    idempotency_key: str = "",
    webhook_url: str = "",
) -> JobExchange | None:
    """Send one job operation to a queue node; its outcome goes to `reply`. Returns the exchange that
    takes the request body (None when refused at once).

    Counts against `max_inflight` (refused with OVERLOADED beyond it) and in the request metrics, as
    a native run does.

    Raises:
        Nothing: refusals are answered through `reply`.
    """
    if (why := caller.priority_refusal(priority)) is not None:
        reply.wire_error(ErrorCode.PERMISSION_DENIED, why, 0)
        return None
    link = ing.upstream.pick(caller.region)
    if link is None:
        where = f" in region {caller.region!r}" if caller.region else ""
        reply.wire_error(ErrorCode.NO_CAPACITY, f"no queue node{where} is reachable", 1000)
        return None
    ticket = ing.admit(caller)
    if isinstance(ticket, Refusal):
        reply.wire_error(ErrorCode.OVERLOADED, ticket.message, ticket.retry_after_ms)
        return None
    meta = RequestMeta(
        model,
        content_type=content_type,
        params=params or {},
        tenant=caller.tenant,
        priority=priority,
        job_id=job_id,
        op=op,
        idempotency_key=idempotency_key,
        webhook_url=webhook_url,
        filter=caller.filter,  # a job's input is filtered under its key's policy, as a sync request's
        request_id=ex.request_id,
    )
    return JobExchange(ing, ex, link, meta, reply, ticket)


def _discard(chunk: bytes) -> None:
    """The body of a status/result/cancel request: read (the connection stays usable), not sent."""


class JobExchange(RunExchange):
    """One job operation in flight; the upstream `Sink` of its stream. `RunExchange` streams the
    request body up; the answer is collected here (bounded by `max_body`) and handed to the `Reply`."""

    __slots__ = ("limit", "parts", "reply", "size")

    def __init__(
        self, ing: Ingress, ex: Exchange, link: LinkBase, meta: RequestMeta, reply: Reply, ticket: Ticket
    ) -> None:
        super().__init__(ing, ex, link, meta, False, ticket)
        self.reply = reply
        self.parts: list[Buffer] = []
        self.size = 0
        self.limit = ing.config.max_body
        self.model = meta.model if meta.op == "submit" else f"job:{meta.op}"  # the metrics label
        if meta.op != "submit":
            ex.on_body = _discard

    def on_frame(self, frame: Frame, t: float) -> None:
        if self.done:
            return
        if frame.type is _ERROR:
            meta = frame.meta
            assert isinstance(meta, ErrorMeta)
            self.t_answer = t
            self._error(meta.code, meta.message, meta.retry_after_ms, meta.param, meta.timing)
            return
        if frame.type is _RESPONSE:
            self.rmeta = frame.meta  # type: ignore[assignment]
        n = len(frame.payload)
        if n:
            self.size += n
            if self.size > self.limit:
                Upstream.cancel(self.link, self.sid, "answer too large for the ingress")
                self._error(ErrorCode.PAYLOAD_TOO_LARGE, f"the job's answer exceeds {self.limit} bytes", 0)
                return
            self.parts.append(frame.payload)
        if frame.end:
            self.t_answer = t
            self._answer()

    def _answer(self) -> None:
        self.done = True
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if isinstance(body, bytearray):
            body = memoryview(body)
        rmeta = self.rmeta or _NO_RESPONSE
        try:
            status = self.reply.answer(JobAnswer(rmeta.content_type, rmeta.headers, body))
        except ValueError as exc:  # msgspec.DecodeError included: the queue node broke SPEC §3.8.1
            status = self.reply.wire_error(ErrorCode.PROTOCOL_ERROR, f"bad job answer from the queue node: {exc}", 0)
        self.ing.finished(self, status, None, self._ingress_ms(perf_counter()))

    def _error(
        self, code: int, message: str, retry_after_ms: int, param: str = "", timing: dict[str, float] | None = None
    ) -> None:
        self.done = True
        status = self.reply.wire_error(code, message, retry_after_ms)
        self.ing.finished(self, status, timing, self._ingress_ms(perf_counter()))
