"""fal's queue API (DESIGN "API surfaces"), so the unmodified `fal-client` works against the ingress.

Routes, for any path whose first segment is not one of casola's own (`RESERVED`):

- `POST /{owner}/{app}[/{path...}][?fal_webhook=URL]`: submit a job for the model `{app}`. `{owner}`
  is a namespace for fal's URL shape and plays no part in routing; it comes back in the URLs. A
  `{path}` suffix reaches the model as `params["path"]`. The JSON body goes to the model unchanged,
  with its content type. `Idempotency-Key`, `X-Casola-Param-<name>` and `X-Region` work as on the
  native API; `X-Fal-Queue-Priority: low` is priority -1. Answer: 200 `{request_id, status,
  response_url, status_url, cancel_url, queue_position}` with absolute URLs (scheme of the listener,
  the request's Host).
- `GET /{owner}/{app}/requests/{id}/status[?logs=1]`: 202 while IN_QUEUE or IN_PROGRESS, 200 when
  COMPLETED; `logs` (a list with `logs=1`/`true`, else null), `queue_position` while queued,
  `metrics.inference_time` (seconds) once completed. A failed job is COMPLETED with `error` and
  `error_type`, never a FAILED status.
- `GET /{owner}/{app}/requests/{id}`: the result bytes (200, their content type) once completed. A
  failed job: the status `jobs.error_status` gives its `error_type`, except 408/409/429 become 400
  (fal-client retries those up to 10 times, and no retry changes a completed job); body `{detail,
  error, error_type}`. Not completed: 400 `{"detail": "Request is still in progress"}`.
- `PUT /{owner}/{app}/requests/{id}/cancel`: 202 `{"status": "CANCELLATION_REQUESTED"}` for a job
  queued (now completed as cancelled) or running (stopping); 400 `{"status": "ALREADY_COMPLETED"}`;
  404 `{"status": "NOT_FOUND"}` for an unknown id or another tenant's job.

Errors carry fal's `{"detail": ..., "error_type": ...}` with the status the native API would use, and
`x-fal-request-id` when there is a job (fal-client then never takes a 502/503/504 for its own
ingress failing). `Authorization: Key <csk_...>` (what fal-client sends) and `Bearer` both work.
- fal's `workflows/{owner}/{app}` namespace: the same routes under `/workflows`, `{app}` naming a
  workflow (`[workflows.<app>]`, docs/workflows.md); the URLs that come back keep the prefix.

Not implemented: the SSE status stream (`.../status/stream`), fal's `comfy/` namespace,
`X-Fal-Request-Timeout` and `X-Fal-Runner-Hint` (ignored).

What this follows, from reading fal-client 1.0.3's source (fal_client/client.py, auth.py, _headers.py):
- URLs: `https://{FAL_QUEUE_RUN_HOST}/{owner}/{app}[/{path}]` for submit, https hard-coded (hence
  TLS on the ingress); FAL_QUEUE_RUN_HOST is read once at import. After submit it follows only the
  `status_url`, `response_url` and `cancel_url` it got back; `status()`/`result()`/`cancel()` by id
  build `https://{host}/{owner}/{app}/requests/{id}` (+ `/status`, `/cancel`) without `{path}`.
- Submit: `POST`, JSON body (`json=arguments`), headers `Authorization: Key <FAL_KEY>`,
  `User-Agent: fal-client/1.0.3 (python)`, optional `X-Fal-Runner-Hint`, `X-Fal-Queue-Priority`
  (normal|low), `X-Fal-Request-Timeout` (seconds); `?fal_webhook=` when given. No idempotency header.
  Reads `request_id`, `response_url`, `status_url`, `cancel_url` from the (any 2xx) answer.
- Status: `GET status_url?logs=true|false` (httpx renders the bool); any 2xx is parsed:
  `IN_QUEUE` needs `queue_position`; `IN_PROGRESS` and `COMPLETED` need the key `logs` (KeyError
  otherwise; null is fine); `COMPLETED` reads `metrics` (optional), `error`, `error_type`. Any other
  status raises ValueError. `iter_events()` polls every 0.1 s until COMPLETED; `get()` then fetches
  `response_url` and returns `response.json()`; `subscribe()` is submit + iter_events + get.
- Cancel: `PUT cancel_url`; any 2xx is success, anything else raises.
- Errors: any 4xx/5xx raises FalClientHTTPError(message = body["detail"] (else the text),
  status_code, error_type = body["error_type"] or header `x-fal-error-type`). Every request is retried
  (10 attempts, exponential backoff) on 408, 409, 429, transport errors, and 502/503/504 only when
  the body says "nginx" and there is no `x-fal-request-id` header.
- fal's documented answers (fal.ai/docs inference-api): submit 200 with status IN_QUEUE; status 202
  while queued or in progress, 200 when completed; cancel statuses CANCELLATION_REQUESTED (202),
  ALREADY_COMPLETED (400), NOT_FOUND.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgspec

from casola.ingress.envelope import JSON_CT
from casola.ingress.exchange import Exchange
from casola.ingress.fields import value_or
from casola.ingress.jobs import (
    COMPLETED,
    IN_QUEUE,
    MAX_IDEMPOTENCY_KEY,
    JobAnswer,
    authorize,
    base_url,
    error_status,
    header_params,
    job_id,
    query,
    start,
)
from casola.ingress.native import error_headers
from casola.jobview import JobView, decode_view
from casola.wire import ErrorCode, error_info
from casola.wire.meta import JobOp

if TYPE_CHECKING:
    from casola.ingress.server import Ingress

__all__ = ["RESERVED", "FalReply", "route", "status_document"]

# First path segments that belong to casola's own APIs, never to a fal owner.
_WORKFLOWS: Final = b"workflows"
RESERVED: Final = frozenset({b"v1", b"openai", b".well-known", b"healthz", b"metrics"})
_REQUESTS: Final = b"requests"
_OCTET_B: Final = b"application/octet-stream"
_LOGS_ON: Final = ("1", "true", "True", "yes", "on")
_RETRIED: Final = (408, 409, 429)  # statuses fal-client retries: a completed job's error is final
_encoder: Final = msgspec.json.Encoder()


class FalReply:
    """Renders one job operation in fal's shapes."""

    __slots__ = ("ex", "logs", "op", "rid", "urls_base")

    def __init__(self, ing: Ingress, ex: Exchange, op: JobOp, owner: str, app: str, rid: str = "") -> None:
        self.ex, self.op, self.rid = ex, op, rid
        self.urls_base = f"{base_url(ing, ex)}/{owner}/{app}/requests/"
        self.logs = False

    def urls(self, rid: str) -> dict[str, str]:
        url = self.urls_base + rid
        return {"response_url": url, "status_url": url + "/status", "cancel_url": url + "/cancel"}

    def _send(self, status: int, doc: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None) -> int:
        headers = [(b"content-type", JSON_CT)]
        if self.rid:
            headers.append((b"x-fal-request-id", self.rid.encode()))
        if extra:
            headers += extra
        self.ex.respond(status, headers, _encoder.encode(doc))
        return status

    def answer(self, ans: JobAnswer) -> int:
        if self.op == "result" and ans.headers.get("job-view") != "1":
            ct = value_or(ans.content_type, _OCTET_B)
            self.ex.respond(200, [(b"content-type", ct), (b"x-fal-request-id", self.rid.encode())], ans.body)
            return 200
        view = decode_view(ans.body)
        self.rid = view.request_id
        if self.op == "submit":
            doc: dict[str, Any] = {"request_id": view.request_id, "status": view.status, **self.urls(self.rid)}
            doc["queue_position"] = view.queue_position or 0
            return self._send(200, doc)
        if self.op == "status":
            return self._send(
                200 if view.status == COMPLETED else 202, status_document(view, self.urls(self.rid), self.logs)
            )
        if self.op == "cancel":
            # The queue node says whether this very cancel stopped the job (`job-cancelled`); a node
            # without that header: a job completed as cancelled counts as cancelled by this request.
            cancelled = ans.headers.get("job-cancelled", "1" if view.error_type == "cancelled" else "0") == "1"
            if view.status == COMPLETED and not cancelled:
                return self._send(400, {"status": "ALREADY_COMPLETED"})
            return self._send(202, {"status": "CANCELLATION_REQUESTED"})
        return self._result_view(view)

    def _result_view(self, view: JobView) -> int:
        if view.status != COMPLETED:
            return self._send(400, {"detail": "Request is still in progress"})
        if not view.error_type:  # completed, no error, no result bytes: an empty result
            ct = value_or(view.result_content_type, _OCTET_B)
            self.ex.respond(200, [(b"content-type", ct), (b"x-fal-request-id", self.rid.encode())])
            return 200
        status = error_status(view.error_type)
        if status in _RETRIED:
            status = 400
        message = view.error or f"the request failed ({view.error_type})"
        doc = {"detail": message, "error": message, "error_type": view.error_type}
        return self._send(status, doc, [(b"x-fal-error-type", value_or(view.error_type, b"error"))])

    def wire_error(self, code: int, message: str, retry_after_ms: int) -> int:
        info = error_info(code)
        doc: dict[str, Any] = {"detail": message, "error_type": info.type}
        if code == ErrorCode.JOB_NOT_FOUND and self.op == "cancel":
            doc["status"] = "NOT_FOUND"
        extra = error_headers(code, retry_after_ms)
        extra.append((b"x-fal-error-type", info.type.encode()))
        return self._send(info.http, doc, extra)

    def http_error(self, status: int, message: str, type: str, code: str) -> int:
        return self._send(status, {"detail": message, "error_type": type}, [(b"x-fal-error-type", type.encode())])


def status_document(view: JobView, urls: dict[str, str], logs: bool) -> dict[str, Any]:
    """fal's status JSON for a job view (`logs`: the caller asked for them)."""
    doc: dict[str, Any] = {"status": view.status, "request_id": view.request_id, **urls}
    if view.status == IN_QUEUE:
        doc["queue_position"] = view.queue_position or 0
    doc["logs"] = view.logs if logs else None  # fal-client reads the key whatever the status
    if view.status == COMPLETED:
        doc["metrics"] = {} if view.inference_ms is None else {"inference_time": view.inference_ms / 1000}
        if view.error_type:
            doc["error"] = view.error or f"the request failed ({view.error_type})"
            doc["error_type"] = view.error_type
    return doc


def route(ing: Ingress, ex: Exchange) -> bool:
    """Serve `ex` if its path is one of fal's; False (nothing sent) when it is not.

    Raises:
        Nothing: every outcome is answered.
    """
    segs = ex.path[1:].split(b"/")
    if len(segs) < 2 or segs[0] in RESERVED or not all(segs):
        return False
    namespace = b""
    if segs[0] == _WORKFLOWS and len(segs) >= 3:  # fal's workflows/{owner}/{app}: {app} is a workflow's name
        namespace, segs = _WORKFLOWS + b"/", segs[1:]
    owner, app = (namespace + segs[0]).decode("latin-1"), segs[1].decode("latin-1")
    if len(segs) == 2 or segs[2] != _REQUESTS:
        if ex.method != b"POST":
            return False
        _submit(ing, ex, owner, app, b"/".join(segs[2:]).decode("latin-1"))
        return True
    tail = segs[4:] if len(segs) >= 4 else None
    if tail == []:
        op: JobOp = "result"
        allow = b"GET"
    elif tail == [b"status"]:
        op, allow = "status", b"GET"
    elif tail == [b"cancel"]:
        op, allow = "cancel", b"PUT"
    else:
        return False
    if ex.method != allow and not (allow == b"GET" and ex.method == b"HEAD"):
        reply = FalReply(ing, ex, op, owner, app)
        reply._send(405, {"detail": f"use {allow.decode()}"}, [(b"allow", allow)])
        return True
    _job_op(ing, ex, op, owner, app, segs[3])
    return True


def _submit(ing: Ingress, ex: Exchange, owner: str, app: str, path: str) -> None:
    reply = FalReply(ing, ex, "submit", owner, app)
    caller = authorize(ing, ex, reply.http_error)
    if caller is None:
        return
    key = (ex.header(b"idempotency-key") or b"").decode("latin-1")
    if len(key) > MAX_IDEMPOTENCY_KEY:
        reply.http_error(
            400,
            f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters",
            "invalid_request_error",
            "bad_request",
        )
        return
    params = header_params(ex)
    if path:
        params["path"] = path
    start(
        ing,
        ex,
        reply,
        caller,
        "submit",
        model=app,
        params=params,
        content_type=(ex.header(b"content-type") or b"").decode("latin-1"),
        priority=-1 if (ex.header(b"x-fal-queue-priority") or b"").lower() == b"low" else 0,
        idempotency_key=key,
        webhook_url=query(ex).get("fal_webhook", ""),
    )


def _job_op(ing: Ingress, ex: Exchange, op: JobOp, owner: str, app: str, rid_b: bytes) -> None:
    rid = job_id(rid_b)
    reply = FalReply(ing, ex, op, owner, app, rid or "")
    caller = authorize(ing, ex, reply.http_error)
    if caller is None:
        return
    if rid is None:
        reply.wire_error(ErrorCode.JOB_NOT_FOUND, "no such request", 0)
        return
    if op == "status":
        reply.logs = query(ex).get("logs", "") in _LOGS_ON
    start(ing, ex, reply, caller, op, job_id=rid)
