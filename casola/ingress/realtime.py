"""`GET /v1/realtime?model=NAME`: one WebSocket joined to one upstream frame stream, both ways, for the
life of the connection; and `POST /v1/realtime/sessions`, which mints the short-lived token a browser
connects with (casola/ingress/sessiontoken.py). The contract for client authors is docs/realtime.md.

Before the 101 the request is authenticated (`Authorization` as on every route, or `?token=`),
admitted (one in-flight place per open WebSocket, per tenant and key, as any request) and given a queue
node; a refusal is an ordinary HTTP error answer with the JSON envelope and X-Request-Id. After it, the
stream opens upstream: REQUEST (the caller's tenant, filter policy, priority and request id, as
`Ingress.request_head` builds them; no FLAG_END, no deadline unless the client names one), then

- each WebSocket message becomes one DATA frame: a tag byte, then the message (0x01 text, UTF-8 JSON;
  0x02 binary, audio);
- each upstream DATA frame becomes one message by its tag byte (anything else: close 1011);
- the upstream RESPONSE head becomes the text message `{"type": "session.started", ...}`; END closes
  with 1000; ERROR sends `{"type": "error", "error": {...}}` (the HTTP envelope's fields) and closes
  with the code `close_code` maps it to;
- the client's Close sends END upstream; the connection's loss (or a limit the adapter enforces)
  sends CANCEL.

Backpressure: client messages stop being read while the upstream link's write buffer is full (as a
native run's request body); messages out are bounded by the adapter's slow-reader limits.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import msgspec

from casola.auth import AuthError
from casola.ingress.accesslog import ACCESS, log_access
from casola.ingress.admission import Refusal, Ticket
from casola.ingress.envelope import JSON_CT
from casola.ingress.exchange import Exchange
from casola.ingress.jobs import Caller, authorize, base_url, caller_of, query
from casola.ingress.native import send_wire_error
from casola.ingress.sessiontoken import SessionTokens
from casola.ingress.upstream import Upstream
from casola.ingress.websocket import (
    BINARY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_RESTART,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    TEXT,
    HandshakeError,
    WebSocket,
    WsLimits,
    accept,
    check_handshake,
)
from casola.net.link import LinkBase
from casola.realtime.errors import wire_error
from casola.realtime.framing import CONTENT_TYPE, TAG_BINARY, TAG_TEXT, FramingError, MessageReader, message
from casola.wire import Buffer, ErrorCode, ErrorMeta, Frame, FrameType, RequestMeta, error_info, error_name

if TYPE_CHECKING:
    from casola.ingress.server import Ingress

__all__ = ["CONTENT_TYPE", "OPENAI_PATH", "PATH", "PREFIX", "SESSIONS", "Realtime", "Session", "close_code"]

log = logging.getLogger("casola.ingress")

PATH: Final = b"/v1/realtime"
PREFIX: Final = PATH + b"/"
OPENAI_PATH: Final = b"/openai/v1/realtime"  # the same session, in OpenAI Realtime's events
SESSIONS: Final = b"/v1/realtime/sessions"
_TAG_OF: Final = {TEXT: TAG_TEXT, BINARY: TAG_BINARY}
SESSIONS_FULL_RETRY_MS: Final = 5000  # a session ends when a conversation does: not soon
_MAX_SESSION_BODY: Final = 4096  # POST /v1/realtime/sessions: {"model": ...} and little else
_REQUEST, _RESPONSE, _ERROR = FrameType.REQUEST, FrameType.RESPONSE, FrameType.ERROR
_JSON: Final = msgspec.json.Encoder()

# Upstream error codes -> WebSocket close codes (others: 1008 for the client's errors, 4xx; else 1011).
_CLOSE_FOR: Final[dict[int, int]] = {
    ErrorCode.SHUTTING_DOWN: CLOSE_RESTART,  # 1012: reconnect (a drain)
    ErrorCode.OVERLOADED: CLOSE_TRY_LATER,  # 1013: try again later
    ErrorCode.NO_CAPACITY: CLOSE_TRY_LATER,
    ErrorCode.PAYLOAD_TOO_LARGE: CLOSE_TOO_BIG,
    ErrorCode.CANCELLED: CLOSE_INTERNAL,
}


def close_code(code: int) -> int:
    """The WebSocket close code for an upstream error code (docs/realtime.md, "Close codes")."""
    if (ws := _CLOSE_FOR.get(code)) is not None:
        return ws
    return CLOSE_POLICY if 400 <= error_info(code).http < 500 else CLOSE_INTERNAL


def error_event(code: int, message: str, retry_after_ms: int = 0, param: str = "", openai: bool = False) -> bytes:
    """`{"type": "error", "error": {...}}`: the HTTP envelope's fields for a wire error code, and its
    retry hints; on the OpenAI path with the `event_id`s its clients expect."""
    err = wire_error(code, message, retry_after_ms, param)
    if openai:
        err["event_id"] = None  # no client event caused it
        return _JSON.encode({"type": "error", "event_id": "event_" + secrets.token_hex(8), "error": err})
    return _JSON.encode({"type": "error", "error": err})


class _SessionRequest(msgspec.Struct):
    model: str = ""


class Realtime:
    """The realtime routes of one ingress, its session tokens, and its open sessions."""

    __slots__ = ("ing", "limits", "sessions", "tokens")

    def __init__(self, ing: Ingress) -> None:
        cfg = ing.config
        self.ing = ing
        self.limits = WsLimits(
            max_message=cfg.ws_max_message,
            ping_interval=cfg.ws_ping_interval,
            ping_timeout=cfg.ws_ping_timeout,
            max_unread=cfg.ws_max_unread,
            send_timeout=cfg.send_timeout,
        )
        self.tokens = SessionTokens(ttl=cfg.realtime_token_ttl)
        self.sessions: set[Session] = set()

    def route(self, ex: Exchange) -> None:
        """`/v1/realtime...`, and every WebSocket upgrade request (only /v1/realtime takes one)."""
        path = ex.path
        if ex.upgrade and path not in (PATH, OPENAI_PATH):
            where = path.decode("latin-1")
            msg = f"{where} does not take a WebSocket upgrade (GET /v1/realtime and /openai/v1/realtime do)"
            return ex.send_error(400, msg, "invalid_request_error", "upgrade_not_supported")
        if path == SESSIONS:
            if ex.method != b"POST":
                return ex.not_allowed(b"POST")
            return self._mint(ex)
        if path not in (PATH, OPENAI_PATH):
            msg = f"no route for {ex.method.decode()} {path.decode('latin-1')}"
            return ex.send_error(404, msg, "invalid_request_error", "not_found")
        if ex.method != b"GET":
            return ex.not_allowed(b"GET")
        if not ex.upgrade:
            msg = f"GET {path.decode()} is a WebSocket endpoint: connect with 'Upgrade: websocket' (RFC 6455)"
            hint = [(b"upgrade", b"websocket")]  # RFC 9110 §15.5.22
            return ex.send_error(426, msg, "invalid_request_error", "upgrade_required", None, hint)
        return self._connect(ex)

    def close_all(self, code: int = CLOSE_RESTART, reason: str = "the ingress is stopping: reconnect") -> None:
        """Close every open session (the ingress stops); their streams are cancelled upstream."""
        for s in list(self.sessions):
            s.ws.close(code, reason, wait=False)

    # -- POST /v1/realtime/sessions ------------------------------------------------------------------

    def _mint(self, ex: Exchange) -> None:
        caller = authorize(self.ing, ex, ex.send_error)
        if caller is None:
            return
        parts: list[bytes] = []

        def on_body(chunk: bytes) -> None:
            parts.append(chunk)
            if sum(map(len, parts)) > _MAX_SESSION_BODY and not ex.finished:
                ex.send_error(413, f"the body is limited to {_MAX_SESSION_BODY} bytes", "invalid_request_error",
                              "request_too_large")  # fmt: skip

        def on_end() -> None:
            if not ex.finished:
                self._minted(ex, caller, b"".join(parts))

        ex.on_body, ex.on_body_end = on_body, on_end

    def _minted(self, ex: Exchange, caller: Caller, body: bytes) -> None:
        model = query(ex).get("model", "")
        if body.strip():
            try:
                model = msgspec.json.decode(body, type=_SessionRequest).model or model
            except msgspec.DecodeError as exc:
                msg = f"the body must be a JSON object: {exc}"
                return ex.send_error(400, msg, "invalid_request_error", "bad_request")
        token, expires_at = self.tokens.mint(caller.claims, caller.tenant, time.time(), model)
        url = base_url(self.ing, ex).replace("http", "ws", 1) + PATH.decode() + "?token=" + token
        if model:
            url += "&model=" + quote(model, safe="")
        answer = {"token": token, "expires_at": expires_at, "url": url, "model": model or None}
        headers = [(b"content-type", JSON_CT), (b"cache-control", b"no-store")]
        ex.respond(200, headers, _JSON.encode(answer))

    # -- GET /v1/realtime ------------------------------------------------------------------------------

    def _connect(self, ex: Exchange) -> None:
        try:
            accept_token = check_handshake(ex)
        except HandshakeError as exc:
            code = "upgrade_required" if exc.status == 426 else "bad_handshake"
            return ex.send_error(exc.status, exc.message, "invalid_request_error", code, None, exc.headers)
        q = query(ex)
        auth = self._caller(ex, q.get("token"))
        if auth is None:
            return None
        caller, bound, spend = auth
        openai = ex.path == OPENAI_PATH
        model = q.get("workflow") or q.get("model", "")
        if openai:
            model = self.ing.config.openai_aliases.get(model, model)
        if bound and model and model != bound:
            msg = f"this session token is for {bound!r}, not {model!r}"
            return ex.send_error(403, msg, "permission_error", "token_model_mismatch", "model")
        model = model or bound
        if not model:
            msg = f"name what to connect to: GET {ex.path.decode()}?workflow=NAME (or ?model=NAME)"
            return ex.send_error(400, msg, "invalid_request_error", "missing_model", "model")
        meta = self._meta(ex, model, caller, openai)
        if meta is None:
            return None
        if self._sessions_full(ex, meta.tenant):
            return None
        link = self._admit(ex, caller, meta)
        if link is None:
            return None
        link_, ticket = link
        session = Session(self, ex, caller, meta, link_, ticket)
        if spend is not None:
            spend()
        if accept(ex, session.ws, accept_token):
            self.sessions.add(session)
        else:  # the client left before the 101
            self.ing.release(ticket)

    def _caller(self, ex: Exchange, token: str | None) -> tuple[Caller, str, Any] | None:
        """Who connects: by `?token=` when there is one (and auth is on), else by `Authorization`.
        Returns (caller, the model the token is bound to or "", what spends the token or None); None:
        refused and answered."""
        ing = self.ing
        if token is None or ing.verifier is None:
            caller = authorize(ing, ex, ex.send_error)
            return None if caller is None else (caller, "", None)
        now = time.time()
        try:
            grant = self.tokens.check(token, now)
            claims = grant.claims()
            ing.verifier.check(claims, now)  # the key behind it: not revoked or expired since
        except AuthError as exc:
            ex.send_error(exc.status, exc.message, "authentication_error", exc.code, "token")
            return None
        return caller_of(claims, ""), grant.model, lambda: self.tokens.spend(grant, now)

    def _meta(self, ex: Exchange, model: str, caller: Caller, openai: bool) -> RequestMeta | None:
        """The REQUEST's meta, as `request_head` builds it for a native run; None: refused and answered."""
        ing = self.ing
        tenant = caller.tenant if ing.verifier is not None else ""
        try:
            meta = ing.request_head(ex, model, tenant, caller.filter).meta
        except ValueError as exc:
            ex.send_error(400, str(exc), "invalid_request_error", "bad_request")
            return None
        if meta.priority > caller.max_priority:
            why = caller.priority_refusal(meta.priority) or ""
            send_wire_error(ex, ErrorCode.PERMISSION_DENIED, why, param="priority")
            return None
        # A session lasts as long as the conversation: no deadline but the one the client names.
        own = ex.header(b"x-casola-deadline-ms")
        params = {**meta.params, "dialect": "openai"} if openai else meta.params
        return msgspec.structs.replace(meta, deadline_ms=int(own) if own else 0, content_type=CONTENT_TYPE,
                                       params=params)  # fmt: skip

    def _sessions_full(self, ex: Exchange, tenant: str) -> bool:
        """A session holds its worker's slot for as long as it lasts, so one tenant's may not take
        them all: at most `ws_max_sessions_per_tenant` open at once (429, retryable); True: refused."""
        limit = self.ing.config.ws_max_sessions_per_tenant
        if sum(s.meta.tenant == tenant for s in self.sessions) < limit:
            return False
        msg = f"tenant {tenant!r} has {limit} realtime sessions open, the most it may"
        send_wire_error(ex, ErrorCode.OVERLOADED, msg, SESSIONS_FULL_RETRY_MS)
        return True

    def _admit(self, ex: Exchange, caller: Caller, meta: RequestMeta) -> tuple[LinkBase, Ticket] | None:
        ing = self.ing
        link = ing.upstream.pick(caller.region)
        if link is None:
            where = f" in region {caller.region!r}" if caller.region else ""
            send_wire_error(ex, ErrorCode.NO_CAPACITY, f"no queue node{where} is reachable", 1000)
            return None
        ticket = ing.admit(caller)
        if isinstance(ticket, Refusal):
            send_wire_error(ex, ErrorCode.OVERLOADED, ticket.message, ticket.retry_after_ms)
            return None
        return link, ticket


class Session:
    """One open realtime WebSocket and its upstream stream: the WebSocket's app and the stream's `Sink`."""

    __slots__ = (
        "caller",
        "ex",
        "grace",
        "link",
        "meta",
        "reader",
        "rt",
        "sid",
        "t0",
        "task",
        "ticket",
        "up_open",
        "watch",
        "ws",
    )

    def __init__(
        self, rt: Realtime, ex: Exchange, caller: Caller, meta: RequestMeta, link: LinkBase, ticket: Ticket
    ) -> None:
        self.rt, self.ex, self.caller, self.meta, self.link = rt, ex, caller, meta, link
        self.ticket: Ticket | None = ticket  # its admission place, given back once (None: given back)
        self.ws = WebSocket(self, rt.limits)
        self.reader = MessageReader()  # the upstream's messages, wherever its frames were cut
        self.sid = 0
        self.up_open = False  # the upstream stream is open: not ended by either side
        self.t0 = time.monotonic()
        self.watch = 0  # CredentialWatch handle
        self.task: asyncio.Task[None] | None = None  # waiting for the upstream link to drain
        self.grace: asyncio.TimerHandle | None = None  # after END upstream: how long its answer may take

    # -- the WebSocket's app ------------------------------------------------------------------------------

    def ws_opened(self) -> None:
        link, ing = self.link, self.rt.ing
        if not link.is_up or link.conn.send_credit <= 0:
            return self._fail(ErrorCode.NO_CAPACITY, "the queue node is not taking more requests", 1000)
        self.sid = ing.upstream.open(link, Frame(_REQUEST, 0, self.meta, b"", 0), self)
        self.up_open = True
        claims = self.caller.claims
        if claims is not None and ing.watch is not None:
            self.watch = ing.watch.add(claims, self._unauthenticated)
        return None

    def ws_message(self, opcode: int, data: bytes) -> None:
        if not self.up_open:
            return
        Upstream.send_body(self.link, self.sid, message(_TAG_OF[opcode], data), False)
        if self.link.gate.paused and self.task is None:
            self.ws.pause_reading()
            self.task = self.rt.ing.loop.create_task(self._resume_when_drained())

    def ws_closed(self, code: int, reason: str, by_peer: bool) -> None:
        if self.up_open:
            if by_peer:  # the client is done: the stream ends as a request body does
                Upstream.send_body(self.link, self.sid, b"", True)
                self.grace = self.rt.ing.loop.call_later(self.rt.limits.ping_timeout, self._give_up)
            else:
                self._cancel(reason or "the client went away")
        if self.task is not None:
            self.task.cancel()
            self.task = None
        ing = self.rt.ing
        if self.ticket is not None:
            ing.release(self.ticket)
            self.ticket = None
        if self.watch and ing.watch is not None:
            ing.watch.remove(self.watch)
            self.watch = 0
        self.rt.sessions.discard(self)
        if ACCESS.isEnabledFor(logging.INFO):
            log_access(b"GET", self.ex.path, 101, time.monotonic() - self.ex.t_start, model=self.meta.model,
                       tenant=self.caller.tenant, peer=self.ws.peer, request_id=self.ex.request_id)  # fmt: skip

    # -- the upstream stream's sink --------------------------------------------------------------------

    def on_frame(self, frame: Frame, t: float) -> None:
        if not self.up_open:
            return
        ft = frame.type
        if ft is _ERROR:
            meta = frame.meta
            assert isinstance(meta, ErrorMeta)
            return self._fail(meta.code, meta.message, meta.retry_after_ms, meta.param, upstream=True)
        if frame.end:
            self._ended()
        if not self.ws.is_open:
            return None  # the client closed: what is still coming is dropped
        if ft is _RESPONSE and self.meta.params.get("dialect") != "openai":  # OpenAI's clients know its events only
            started = {"type": "session.started", "request_id": self.ex.request_id, "model": self.meta.model}
            self.ws.send(TEXT, _JSON.encode(started))
        if len(frame.payload) and not self._relay(frame.payload):
            return None
        if frame.end and self.reader.pending:
            return self._fail(ErrorCode.PROTOCOL_ERROR, "the model ended the session inside a message", 0,
                              close=CLOSE_INTERNAL)  # fmt: skip
        if frame.end:
            self.ws.close(CLOSE_NORMAL, "the session ended")
        return None

    def on_reset(self, code: int, message: str) -> None:
        if self.up_open:
            self._fail(code, message, 0, upstream=True)

    def fail(self, exc: BaseException) -> None:
        """Relaying an upstream frame raised (a bug); the upstream has cancelled the stream already."""
        if self.up_open:
            self._fail(ErrorCode.INTERNAL, "internal error while relaying the session", 0, upstream=True)

    # -- the rest -------------------------------------------------------------------------------------

    def _relay(self, payload: Buffer) -> bool:
        """The messages an upstream payload completes, each as one WebSocket message, by its tag;
        False: the upstream sent something else (closed 1011)."""
        try:
            for tag, body in self.reader.feed(payload):
                if tag == TAG_TEXT:
                    str(body, "utf-8")  # the WebSocket's text must be UTF-8: checked, not trusted
                self.ws.send(TEXT if tag == TAG_TEXT else BINARY, body)
        except (FramingError, UnicodeDecodeError) as exc:
            what = "text that is not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
            log.warning("realtime %s: the model sent %s; closing", self.meta.model, what,
                        extra={"request_id": self.ex.request_id})  # fmt: skip
            self._fail(ErrorCode.PROTOCOL_ERROR, f"the model sent {what}", 0, close=CLOSE_INTERNAL)
            return False
        return True

    def _fail(self, code: int, message: str, retry_after_ms: int, param: str = "", *, upstream: bool = False,
              close: int = 0) -> None:  # fmt: skip
        """End the session with an error event and a close; the upstream stream is ended (cancelled
        unless the error came from there)."""
        if upstream:
            self._ended()
        elif self.up_open:
            self._cancel(message)
        if self.ws.is_open:
            openai = self.meta.params.get("dialect") == "openai"
            self.ws.send(TEXT, error_event(code, message, retry_after_ms, param, openai))
            self.ws.close(close or close_code(code), error_name(code).lower())

    def _unauthenticated(self, err: AuthError) -> None:
        """The key was revoked or expired while the session is open (CredentialWatch)."""
        self.watch = 0
        if self.up_open:
            self._cancel("the API key is no longer valid")
        if self.ws.is_open:
            body = {"message": err.message, "type": "authentication_error", "param": None, "code": err.code,
                    "retryable": False}  # fmt: skip
            event: dict[str, Any] = {"type": "error", "error": body}
            if self.meta.params.get("dialect") == "openai":
                event["event_id"], body["event_id"] = "event_" + secrets.token_hex(8), None
            self.ws.send(TEXT, _JSON.encode(event))
            self.ws.close(CLOSE_POLICY, err.code)

    def _ended(self) -> None:
        self.up_open = False
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None

    def _cancel(self, message: str) -> None:
        self._ended()
        Upstream.cancel(self.link, self.sid, message)

    def _give_up(self) -> None:
        """The upstream did not finish within `ping_timeout` of the client's Close: cancel it."""
        self.grace = None
        if self.up_open:
            self._cancel("the client closed and the session did not end")

    async def _resume_when_drained(self) -> None:
        try:
            await self.link.drain()
        except ConnectionError:
            return
        finally:
            self.task = None
        self.ws.resume_reading()
