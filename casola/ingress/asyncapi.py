"""The native async API (DESIGN "Two contracts"): submit a job, poll it, fetch its result, cancel it.

Routes (each needs a key with the `run` scope, as `POST /v1/run/{model}` does):

- `POST /v1/run/{model}` with `X-Casola-Async: 1` (or `Prefer: respond-async`, RFC 7240 §4.1):
  persist a job. The body is the input, streamed to the queue node as for a sync run; `Content-Type`,
  `X-Casola-Param-<name>`, `X-Region` as there, plus `Idempotency-Key` (a repeat by the same tenant
  returns the first job) and `X-Casola-Webhook` (URL the outcome is POSTed to). Answer: 202, the job
  document, `Location: <status_url>`.
- `GET /v1/jobs/{id}[?wait_ms=N]`: 200, the job document. `wait_ms` holds the answer until the job
  completes or N ms pass (long poll, at most `WAIT_MAX_MS`).
- `GET /v1/jobs/{id}/result[?wait_ms=N]`: completed with a result: 200, the result bytes with their
  content type. Completed with an error: the error envelope (`type` and `code` are the job's
  `error_type`, status from `jobs.error_status`). Not completed yet: 202, the job document, `Retry-After`.
- `POST /v1/jobs/{id}/cancel` or `DELETE /v1/jobs/{id}`: the job document after the cancel: 200 when
  the job is completed (a queued job completes at once as cancelled), 202 while a running one stops.

The job document is the queue node's job view (casola/jobview.py) plus `status_url`, `response_url`
(the result) and `cancel_url`, absolute. Another tenant's job, or one past its retention, is 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import msgspec

from casola.ingress.envelope import JSON_CT
from casola.ingress.exchange import Exchange
from casola.ingress.fields import value_or
from casola.ingress.jobs import (
    COMPLETED,
    MAX_IDEMPOTENCY_KEY,
    Caller,
    JobAnswer,
    authorize,
    base_url,
    error_status,
    job_id,
    query,
    start,
)
from casola.ingress.native import RunExchange, send_wire_error
from casola.jobview import JobView, decode_view
from casola.wire import ErrorCode, RequestMeta
from casola.wire.meta import JobOp, Param

if TYPE_CHECKING:
    from casola.ingress.server import Ingress

__all__ = ["JOBS_PREFIX", "WAIT_MAX_MS", "NativeReply", "jobs_route", "submit"]

JOBS_PREFIX: Final = b"/v1/jobs/"
# Long polls end after at most this long, well inside the 60 s idle timeouts of the proxies and load
# balancers commonly in front of an API (nginx proxy_read_timeout, AWS ALB idle timeout).
WAIT_MAX_MS: Final = 30_000
_OCTET_B: Final = b"application/octet-stream"
_encoder: Final = msgspec.json.Encoder()


class NativeReply:
    """Renders one job operation for the native API; errors in the one native error envelope."""

    __slots__ = ("base", "ex", "op")

    def __init__(self, ing: Ingress, ex: Exchange, op: JobOp) -> None:
        self.ex, self.op = ex, op
        self.base = base_url(ing, ex)

    def answer(self, ans: JobAnswer) -> int:
        if self.op == "result" and ans.headers.get("job-view") != "1":
            ct = value_or(ans.content_type, _OCTET_B)
            self.ex.respond(200, [(b"content-type", ct), (b"x-casola-job-status", b"COMPLETED")], ans.body)
            return 200
        view = decode_view(ans.body)
        status = 200
        headers = [(b"content-type", JSON_CT), (b"x-casola-job-status", view.status.encode())]
        if self.op == "submit":
            status = 202
            headers.append((b"location", f"{self.base}/v1/jobs/{view.request_id}".encode("latin-1")))
        elif self.op == "cancel":
            status = 200 if view.status == COMPLETED else 202
        elif self.op == "result":
            if view.status == COMPLETED and view.error_type:
                return self._job_error(view)
            if view.status != COMPLETED:
                status = 202
                headers.append((b"retry-after", b"1"))
            else:  # completed, no error, and still no result bytes: an empty result
                ct = value_or(view.result_content_type, _OCTET_B)
                self.ex.respond(200, [(b"content-type", ct), (b"x-casola-job-status", b"COMPLETED")])
                return 200
        self.ex.respond(status, headers, job_document(view, self.base))
        return status

    def _job_error(self, view: JobView) -> int:
        status = error_status(view.error_type)
        message = view.error or f"the job failed ({view.error_type})"
        extra = [(b"x-should-retry", b"false"), (b"x-casola-job-status", b"COMPLETED")]
        self.ex.send_error(status, message, view.error_type, view.error_type, None, extra)
        return status

    def wire_error(self, code: int, message: str, retry_after_ms: int) -> int:
        return send_wire_error(self.ex, code, message, retry_after_ms)

    def http_error(self, status: int, message: str, type: str, code: str) -> int:
        self.ex.send_error(status, message, type, code)
        return status


def job_document(view: JobView, base: str) -> bytes:
    """The job view plus the URLs of its status, result and cancel routes."""
    doc = msgspec.structs.asdict(view)
    url = f"{base}/v1/jobs/{view.request_id}"
    doc.update(status_url=url, response_url=url + "/result", cancel_url=url + "/cancel")
    return _encoder.encode(doc)


def submit(ing: Ingress, ex: Exchange, meta: RequestMeta, caller: Caller) -> RunExchange | None:
    """`POST /v1/run/{model}` asked to run async (`X-Casola-Async: 1` or `Prefer: respond-async`);
    the ingress has authorized it and read its head into `meta` as for a sync run. Returns the
    exchange that takes the body (None when refused at once).

    Raises:
        Nothing: every outcome is answered.
    """
    reply = NativeReply(ing, ex, "submit")
    key = (ex.header(b"idempotency-key") or b"").decode("latin-1")
    if len(key) > MAX_IDEMPOTENCY_KEY:
        msg = f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters"
        reply.http_error(400, msg, "invalid_request_error", "bad_request")
        return None
    return start(
        ing,
        ex,
        reply,
        caller,
        "submit",
        model=meta.model,
        params=meta.params,
        content_type=meta.content_type,
        priority=meta.priority,
        idempotency_key=key,
        webhook_url=(ex.header(b"x-casola-webhook") or b"").decode("latin-1"),
    )


def jobs_route(ing: Ingress, ex: Exchange) -> None:
    """Everything under `/v1/jobs/`. Raises nothing: every outcome is answered."""
    parts = ex.path[len(JOBS_PREFIX) :].split(b"/")
    method = ex.method
    op: JobOp
    if len(parts) == 1:
        allow, op = b"GET, DELETE", "status" if method in (b"GET", b"HEAD") else "cancel"
        ok = method in (b"GET", b"HEAD", b"DELETE")
    elif len(parts) == 2 and parts[1] in (b"result", b"cancel"):
        result = parts[1] == b"result"
        allow, op = (b"GET", "result") if result else (b"POST", "cancel")
        ok = method in (b"GET", b"HEAD") if result else method == b"POST"
    else:
        msg = f"no route for {method.decode()} {ex.path.decode('latin-1')}"
        ex.send_error(404, msg, "invalid_request_error", "not_found")
        return
    if not ok:
        return ex.not_allowed(allow)
    reply = NativeReply(ing, ex, op)
    caller = authorize(ing, ex, reply.http_error)
    if caller is None:
        return
    jid = job_id(parts[0])
    if jid is None:
        reply.wire_error(ErrorCode.JOB_NOT_FOUND, "no such job", 0)  # as the queue node answers any unknown id
        return
    params: dict[str, Param] = {}
    if op != "cancel":
        wait = query(ex).get("wait_ms", "")
        if wait:
            if not (wait.isascii() and wait.isdigit()):
                msg = "wait_ms must be a whole number of milliseconds"
                reply.http_error(400, msg, "invalid_request_error", "bad_request")
                return
            params["wait_ms"] = min(int(wait[:9]) if len(wait) <= 9 else WAIT_MAX_MS, WAIT_MAX_MS)
    start(ing, ex, reply, caller, op, job_id=jid, params=params)
