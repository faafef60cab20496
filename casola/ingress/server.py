"""The ingress: HTTP and raw-frame listeners, routing, local auth, and the bookkeeping per request.

Routes: `POST /v1/run/{model}` (native, streamed both ways; with `X-Casola-Async: 1` it submits an
async job), `/v1/jobs/...` (the native async API, casola/ingress/asyncapi.py), `GET /healthz`,
`GET /metrics`, `GET /v1/signals` (scope `signals`), `GET /v1/realtime` (a WebSocket) and
`POST /v1/realtime/sessions` (casola/ingress/realtime.py), `/openai/v1/...` (the OpenAI-compatible
surface, casola/ingress/openai.py), then fal's queue API for any other path of two
or more segments (casola/ingress/fal.py).
Authentication is local (Ed25519 tokens, `casola.auth`): no remote call on the request path.
With `tls_cert` and `tls_key` set both listeners speak TLS (HTTPS, and frames over TLS).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from time import perf_counter
from typing import Any, NamedTuple

import msgspec

from casola.auth import SCOPE_RUN, SCOPE_SIGNALS, Claims, CredentialWatch, Verifier
from casola.certs import server_context
from casola.ingress import asyncapi, fal, openai, realtime
from casola.ingress.admission import Admission, Refusal, Ticket
from casola.ingress.cors import Cors
from casola.ingress.envelope import JSON_CT
from casola.ingress.fields import field_value
from casola.ingress.frames import FrameListener
from casola.ingress.http import Exchange, HttpLimits, serve_http
from casola.ingress.jobs import Caller, authorize
from casola.ingress.metrics import Metrics
from casola.ingress.native import RunExchange, send_wire_error, unread_max
from casola.ingress.requestid import RequestIds, trace_context
from casola.ingress.upstream import QueueNodeSpec, Upstream
from casola.wire import DEFAULT_LIMITS, ErrorCode, RequestMeta
from casola.wire.meta import FilterPolicy

__all__ = ["Ingress", "IngressConfig"]

log = logging.getLogger("casola.ingress")

_RUN = b"/v1/run/"
_WORKFLOWS = b"/v1/workflows"
_PARAM = b"x-casola-param-"
_TRUE = (b"1", b"true", b"on", b"yes")
_GET = (b"GET", b"HEAD")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")
# Routes with a fixed path, and the methods each takes (others: 405 with Allow).
_FIXED_ROUTES: dict[bytes, tuple[bytes, ...]] = {
    b"/healthz": _GET,
    b"/readyz": _GET,
    b"/metrics": _GET,
    b"/v1/signals": _GET,
}


class RequestHead(NamedTuple):
    """What a request's headers ask for (`Ingress.request_head`)."""

    meta: RequestMeta  # for the queue node
    run_async: bool  # X-Casola-Async / Prefer: respond-async: submit a job
    trace: bool  # Server-Timing on the answer: X-Casola-Trace, or [ingress] trace


class IngressConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    http: str = "127.0.0.1:8000"
    frames: str = "127.0.0.1:7700"  # raw-frame listener; "" disables it
    node_id: str = "ingress-1"
    trace: bool = False  # Server-Timing on every response (else only with X-Casola-Trace: 1)
    timing_allow_origin: str = ""  # e.g. "*": lets browsers read Server-Timing
    cors_origins: list[str] = []  # origins whose pages may call the API ("https://app.example", or "*")
    backlog: int = 2048  # the listen queue of both listeners (connections not yet accepted)
    max_inflight: int = 4096  # requests in progress; beyond: 429 at once (fairly: casola/ingress/admission.py)
    max_inflight_per_tenant: int = 1024  # of those, one tenant's; a key may carry a lower limit of its own
    default_deadline_ms: int = 0  # applied when a request names none; 0 = none
    queue_nodes: list[QueueNodeSpec] = []  # `casola ingress`; `casola up` adds its own queue node
    max_body: int = 64 * 1024 * 1024
    max_head: int = 16 * 1024
    max_headers: int = 100
    idle_timeout: float = 30.0
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0  # a client that takes no answer bytes this long is aborted
    tls_cert: str = ""  # PEM certificate chain (leaf first); with tls_key: HTTPS on the HTTP listener
    tls_key: str = ""  # PEM private key of tls_cert; both empty = plain HTTP
    openai_aliases: dict[str, str] = {}  # /openai/v1 model names to served ones, e.g. {"whisper-1": "asr"}
    # WebSockets (GET /v1/realtime; casola/ingress/websocket.py says why these values)
    ws_max_message: int = 1024 * 1024  # bytes of one message from a client; larger: close 1009
    ws_ping_interval: float = 20.0  # seconds between keep-alive pings (0: none)
    ws_ping_timeout: float = 20.0  # no pong (or no answer to our close) this long: closed
    ws_max_unread: int = 8 * 1024 * 1024  # bytes a client may leave unread before it is dropped
    ws_max_sessions_per_tenant: int = 16  # realtime sessions one tenant may hold open (each holds a worker slot)
    realtime_token_ttl: int = 60  # seconds a session token (POST /v1/realtime/sessions) is valid

    def __post_init__(self) -> None:
        # Both bounds at least 1; and twice max_inflight (the fair overshoot) must stay below half a
        # queue node's stream window (65,536), so its credit never runs out (SPEC §7.2).
        if not 1 <= self.max_inflight <= 16384 or self.max_inflight_per_tenant < 1:
            raise ValueError("ingress max_inflight must be 1..16384 and max_inflight_per_tenant at least 1")
        for origin in self.cors_origins:
            if origin != "*" and _ORIGIN.fullmatch(origin) is None:
                raise ValueError(f"ingress cors_origins: {origin!r} is not an origin (scheme://host[:port], or *)")
        if not 1 <= self.backlog <= 65535:
            raise ValueError("ingress backlog must be 1..65535")
        if not 1 <= self.ws_max_message < DEFAULT_LIMITS.max_payload:  # + the tag byte: one DATA frame
            raise ValueError(f"ingress ws_max_message must be 1..{DEFAULT_LIMITS.max_payload - 1}")
        if self.ws_ping_interval < 0 or self.ws_ping_timeout <= 0 or self.ws_max_unread < 1:
            raise ValueError("ingress ws_ping_interval must be >= 0, ws_ping_timeout and ws_max_unread positive")
        if self.ws_max_sessions_per_tenant < 1:
            raise ValueError("ingress ws_max_sessions_per_tenant must be at least 1")
        if self.realtime_token_ttl < 1:
            raise ValueError("ingress realtime_token_ttl must be at least 1 second")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("ingress tls_cert and tls_key must be set together (or both left empty)")


class Ingress:
    def __init__(self, config: IngressConfig, verifier: Verifier | None, upstream: Upstream) -> None:
        self.config = config
        self.verifier = verifier
        self.upstream = upstream
        self.metrics = Metrics()
        self.cors = Cors(config.cors_origins, config.timing_allow_origin)
        self.request_ids = RequestIds()
        self.loop: asyncio.AbstractEventLoop  # set in start()
        self.queue_snapshot: Any = None
        self.queue_signals: Any = None  # the in-process queue node's signals (`casola up`)
        self.workflows: list[dict[str, Any]] = []  # GET /v1/workflows: the config's, described
        self.required_models: list[str] = []  # /readyz: models that must have a worker (`casola up`)
        self.draining = False  # set when the process is stopping: /readyz answers 503
        self._servers: list[asyncio.Server] = []
        self.admission = Admission(config.max_inflight, config.max_inflight_per_tenant)
        # Open raw-frame connections' keys, re-checked several times a second (revocation, expiry).
        self.watch = CredentialWatch(verifier) if verifier is not None else None
        self.frames = FrameListener(self)
        self._limits = HttpLimits(
            max_body=config.max_body,
            max_head=config.max_head,
            max_headers=config.max_headers,
            idle_timeout=config.idle_timeout,
            head_timeout=config.head_timeout,
            body_timeout=config.body_timeout,
            send_timeout=config.send_timeout,
        )
        self.unread_max = unread_max(config.max_body)  # answer bytes a client may leave unread
        self.realtime = realtime.Realtime(self)  # WebSocket sessions, and their tokens

    @property
    def in_flight(self) -> int:
        """Requests in progress (the count `max_inflight` bounds, exported as casola_in_flight)."""
        return self.admission.total

    @property
    def tls(self) -> bool:
        """Whether the HTTP listener speaks TLS (HTTPS)."""
        return bool(self.config.tls_cert)

    async def start(self) -> None:
        """Open the listeners.

        Raises:
            OSError: an address cannot be bound, or a TLS file cannot be read.
            ssl.SSLError: `tls_cert`/`tls_key` are not a PEM certificate chain and its key.
        """
        self.loop = asyncio.get_running_loop()
        host, _, port = self.config.http.rpartition(":")
        tls: dict[str, Any] = {}
        ctx = None
        if self.tls:  # a handshake gets as long as a request head (slow clients)
            ctx = server_context(self.config.tls_cert, self.config.tls_key)
            tls.update(ssl=ctx, ssl_handshake_timeout=self.config.head_timeout)
        backlog = self.config.backlog
        self._servers.append(await serve_http(self.handle, host, int(port), self._limits, backlog=backlog, **tls))
        if self.config.frames:
            host, _, port = self.config.frames.rpartition(":")
            self._servers.append(await self.frames.start(host, int(port), ssl=ctx))
        if self.watch is not None:
            self.watch.start()

    @property
    def ports(self) -> list[int]:
        return [int(s.sockets[0].getsockname()[1]) for s in self._servers]

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        self.frames.close_all()
        self.realtime.close_all()
        if self.watch is not None:
            await self.watch.stop()
        for s in self._servers:
            await s.wait_closed()

    # -- per request -------------------------------------------------------------------------------

    def handle(self, ex: Exchange) -> None:
        origin, encoding = self._begin(ex)
        path, method = ex.path, ex.method
        if method == b"OPTIONS":
            return self.cors.preflight(ex, origin)
        if encoding is not None and encoding.lower() != b"identity":
            return ex.send_error(
                415,
                f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the body as is",
                "invalid_request_error",
                "unsupported_content_encoding",
                None,
                [(b"accept-encoding", b"identity")],
            )
        if ex.upgrade:  # a WebSocket upgrade, to whichever path: only /v1/realtime takes one
            return self.realtime.route(ex)
        if path.startswith(_RUN):
            if method != b"POST":
                return ex.not_allowed(b"POST")
            return self._run(ex, path[len(_RUN) :])
        if path.startswith(asyncapi.JOBS_PREFIX):
            return asyncapi.jobs_route(self, ex)
        if path == realtime.PATH or path.startswith(realtime.PREFIX) or path == realtime.OPENAI_PATH:
            return self.realtime.route(ex)
        if path == _WORKFLOWS or path.startswith(_WORKFLOWS + b"/"):
            return self._workflows(ex, path[len(_WORKFLOWS) + 1 :])
        if (allow := _FIXED_ROUTES.get(path)) is not None:
            if method not in allow:
                return ex.not_allowed(b", ".join(allow))
            return self._fixed(ex, path)
        if path.startswith(openai.PREFIX):
            return openai.route(self, ex)
        if fal.route(self, ex):  # any other path of 2+ segments: fal's queue API
            return None
        ex.send_error(
            404, f"no route for {method.decode()} {path.decode('latin-1')}", "invalid_request_error", "not_found"
        )

    def _begin(self, ex: Exchange) -> tuple[bytes | None, bytes | None]:
        """Give the request its id and every answer its common headers (X-Request-Id, CORS), in one
        pass over the headers; returns the `Origin` and `Content-Encoding` it sent, if any."""
        rid = origin = encoding = None
        for name, value in ex.headers:
            if name == b"x-request-id":
                rid = value
            elif name == b"origin":
                origin = value
            elif name == b"content-encoding":
                encoding = value
        ex.request_id = request_id = self.request_ids.of(rid)
        cors = self.cors.timing_any if origin is None else self.cors.lines(origin)
        ex.common = b"X-Request-Id: " + request_id.encode() + b"\r\n" + cors
        return origin, encoding

    def _fixed(self, ex: Exchange, path: bytes) -> None:
        if path == b"/healthz":
            return self._healthz(ex)
        if path == b"/readyz":
            return self._readyz(ex)
        if path == b"/metrics":
            return self.metrics.respond(ex, self.verifier)
        return self._signals(ex)

    def authenticate(self, token: str | bytes | None, scope: str = SCOPE_RUN) -> Claims | None:
        """Claims of a valid key; None when auth is off. Raises AuthError."""
        if self.verifier is None:
            return None
        return self.verifier.verify(token, time.time(), scope)

    def _workflows(self, ex: Exchange, name: bytes) -> None:
        """`GET /v1/workflows`: those declared; `POST /v1/workflows/{name}`: run one (as /v1/run)."""
        if not name:
            if ex.method not in _GET:
                return ex.not_allowed(b", ".join(_GET))
            if authorize(self, ex, ex.send_error) is None:
                return None
            body = msgspec.json.encode({"object": "list", "data": self.workflows})
            return ex.respond(200, [(b"content-type", JSON_CT)], body)
        if ex.method != b"POST":
            return ex.not_allowed(b"POST")
        return self._run(ex, name, "POST /v1/workflows/{name}")

    def _run(self, ex: Exchange, model_b: bytes, route: str = "POST /v1/run/{model}") -> None:
        caller = authorize(self, ex, ex.send_error)
        if caller is None:
            return
        if not model_b or b"/" in model_b:
            return ex.send_error(404, f"no name in the path: {route}", "invalid_request_error", "not_found")
        # With auth off a sync request carries no tenant; a job needs one (`caller.tenant`).
        tenant = caller.tenant if self.verifier is not None else ""
        try:
            head = self.request_head(ex, model_b.decode(), tenant, caller.filter)
        except ValueError as exc:
            return ex.send_error(400, str(exc), "invalid_request_error", "bad_request")
        self.dispatch(ex, head, caller)

    def dispatch(self, ex: Exchange, head: RequestHead, caller: Caller) -> RunExchange | None:
        """Send one authorized request upstream (sync, or as an async job); the returned exchange takes
        the request body (already set as the exchange's body callbacks). None: refused and answered."""
        meta = head.meta
        if head.run_async:
            return asyncapi.submit(self, ex, meta, caller)
        if meta.priority > caller.max_priority:
            why = caller.priority_refusal(meta.priority) or ""
            send_wire_error(ex, ErrorCode.PERMISSION_DENIED, why, param="priority")
            return None
        region = caller.region
        link = self.upstream.pick(region)
        if link is None:
            where = f" in region {region!r}" if region else ""
            send_wire_error(ex, ErrorCode.NO_CAPACITY, f"no queue node{where} is reachable", 1000)
            return None
        ticket = self.admit(caller)
        if isinstance(ticket, Refusal):
            send_wire_error(ex, ErrorCode.OVERLOADED, ticket.message, ticket.retry_after_ms)
            return None
        return RunExchange(self, ex, link, meta, head.trace, ticket)

    def admit(self, caller: Caller) -> Ticket | Refusal:
        """Count a request in, per tenant and key (casola.ingress.admission), or say why not."""
        ticket = self.admission.admit(caller.tenant, caller.kid, caller.max_inflight, perf_counter())
        self.metrics.in_flight = self.admission.total
        return ticket

    def release(self, ticket: Ticket) -> None:
        """An admitted request ended (any outcome); once per ticket."""
        self.admission.release(ticket, perf_counter())
        self.metrics.in_flight = self.admission.total

    def request_head(
        self,
        ex: Exchange,
        model: str,
        tenant: str,
        filter: FilterPolicy = "",
        content_type: str | None = None,
    ) -> RequestHead:
        """The request head from the headers, in one pass. `content_type`, when given (the OpenAI
        surface: a file part's type), wins over the header. The meta always asks the queue node for
        timings (the metrics count every stage); whether the client sees them is `trace`.

        Raises:
            ValueError: a header value is not acceptable (BadField: a content type with control
                or non-ASCII characters).
        """
        params: dict[str, Any] = {}
        deadline = self.config.default_deadline_ms
        run_async = False
        trace = self.config.trace
        priority = 0
        header_ctype = ""
        parent = state = None
        for name, value in ex.headers:
            if name.startswith(_PARAM):
                params[name[len(_PARAM) :].decode("latin-1")] = value.decode("latin-1")
            elif name == b"x-casola-deadline-ms":
                if not value.isdigit() or int(value) > 0xFFFF_FFFF:
                    raise ValueError("X-Casola-Deadline-Ms must be a whole number of milliseconds")
                deadline = int(value)
            elif name == b"x-casola-priority":
                priority = _priority(value)
            elif name == b"content-type":
                header_ctype = value.decode("latin-1")
            elif name == b"x-casola-async":
                run_async = run_async or value.lower() in _TRUE
            elif name == b"prefer":
                run_async = run_async or b"respond-async" in value.lower()
            elif name == b"x-casola-trace":
                trace = trace or value.lower() in _TRUE
            elif name == b"traceparent":
                parent = value
            elif name == b"tracestate":
                state = value if state is None else state + b"," + value  # RFC 9110 §5.3: one list
        ctype = content_type if content_type is not None else header_ctype
        if ctype:
            field_value(ctype, "Content-Type")  # it may come back as the answer's: no control characters
        traceparent, tracestate = trace_context(parent, state) if parent is not None else ("", "")
        meta = RequestMeta(
            model,
            deadline,
            ctype,
            params,
            True,
            tenant,
            priority,
            filter=filter,
            request_id=ex.request_id,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        return RequestHead(meta, run_async, trace)

    def finished(self, rx: RunExchange, status: int, timing: dict[str, float] | None, ingress_ms: float) -> None:
        """One request is over (any outcome): free its place and count it. Once per exchange."""
        self.release(rx.ticket)
        now = perf_counter()
        self.metrics.observe(rx.model, status, now - rx.t0, timing, ingress_ms, rx.upload_s(now) * 1000)

    def _signals(self, ex: Exchange) -> None:
        """What an autoscaler reads: the queue node's per (model, pool) signals (docs/scheduling.md).
        Needs a key with the `signals` scope."""
        if authorize(self, ex, ex.send_error, SCOPE_SIGNALS) is None:
            return None
        nodes = [self.queue_signals()] if self.queue_signals is not None else []
        ex.respond(200, [(b"content-type", JSON_CT)], msgspec.json.encode({"nodes": nodes}))

    def _readyz(self, ex: Exchange) -> None:
        """For load balancers: 200 while this ingress can serve, 503 while it is draining, while no
        queue node is connected, or while a model it is configured to serve has no serving worker
        (what the in-process queue node of `casola up` says). `/healthz` is liveness alone."""
        reasons = ["draining"] if self.draining else []
        if not any(n["up"] for n in self.upstream.snapshot()):
            reasons.append("no queue node is connected")
        if self.required_models and self.queue_snapshot is not None:
            models = self.queue_snapshot()
            for name in self.required_models:
                if not models.get(name, {}).get("workers"):
                    reasons.append(f"model {name!r} has no serving worker")
        body = {"status": "not_ready" if reasons else "ready", "reasons": reasons}
        ex.respond(503 if reasons else 200, [(b"content-type", JSON_CT)], msgspec.json.encode(body))

    def _healthz(self, ex: Exchange) -> None:
        nodes = self.upstream.snapshot()
        body: dict[str, Any] = {"status": "ok" if any(n["up"] for n in nodes) else "unavailable", "queue_nodes": nodes}
        if self.queue_snapshot is not None:
            body["models"] = self.queue_snapshot()
        ex.respond(200 if body["status"] == "ok" else 503, [(b"content-type", JSON_CT)], msgspec.json.encode(body))


def _priority(value: bytes) -> int:
    """`X-Casola-Priority`: a whole number, -128..127 (higher first; how high the key says).

    Raises:
        ValueError: anything else.
    """
    text = value.strip()
    if text[:1] == b"-":
        text = text[1:]
    if not text.isdigit() or len(text) > 3 or not -128 <= (n := int(value)) <= 127:
        raise ValueError("X-Casola-Priority must be a whole number from -128 to 127")
    return n
