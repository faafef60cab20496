"""The OpenAI-compatible surface under `/openai/v1/`: the unmodified `openai` SDK works with only its
`base_url` changed.

- `POST chat/completions`, `POST audio/speech`: JSON; the ingress reads only `model` (msgspec skips
  the rest in C) and forwards the body as it came. The model's worker speaks OpenAI's format itself,
  SSE chunks and `[DONE]` included, so the answer streams through untouched.
- `POST audio/transcriptions`: multipart; the file part goes upstream as the payload (a view into
  the body, no copy) and the other fields become request params (`response_format`, `language`...).
- `GET models`, `GET models/{id}`: the models this ingress can reach.

Errors use OpenAI's envelope (`{"error": {"message", "type", "param", "code"}}`) with the status the
SDK maps to its exception classes (400 BadRequestError, 401, 403, 404 NotFoundError, 429
RateLimitError, 5xx InternalServerError). Model names may be aliased (`[ingress] openai_aliases`, e.g.
`whisper-1 = "asr"`), so client code keeps its names. `X-Casola-Async: 1` / `Prefer: respond-async`
submits a job, as on the native route.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from casola.ingress.envelope import JSON_CT
from casola.ingress.exchange import Exchange
from casola.ingress.jobs import Caller, authorize
from casola.ingress.multipart import MultipartError, boundary_of, parse
from casola.wire import Buffer

if TYPE_CHECKING:
    from casola.ingress.server import Ingress

__all__ = ["PREFIX", "route"]

PREFIX = b"/openai/v1/"
_CREATED = int(time.time())  # models have no creation time here; a stable one per process
mimetypes.init()  # reads the system's type tables once now, not during the first transcription (~4 ms)
_FEED = 1 << 20
_JSON_MSG = "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."


class _Head(msgspec.Struct):
    """The one field of a JSON request the ingress needs; every other field is skipped unparsed."""

    model: str = ""


_head_decoder = msgspec.json.Decoder(_Head)


def route(ing: Ingress, ex: Exchange) -> None:
    """Everything under `/openai/v1/`. Raises nothing: every outcome is answered."""
    sub = ex.path[len(PREFIX) :]
    post = ex.method == b"POST"
    if sub in (b"chat/completions", b"audio/speech") and post:
        _with_body(ing, ex, _json_call)
    elif sub == b"audio/transcriptions" and post:
        _with_body(ing, ex, _transcription)
    elif sub == b"models" and ex.method in (b"GET", b"HEAD"):
        _models(ing, ex)
    elif sub.startswith(b"models/") and ex.method in (b"GET", b"HEAD"):
        _model(ing, ex, sub[len(b"models/") :].decode("utf-8", "replace"))
    elif sub in (b"chat/completions", b"audio/speech", b"audio/transcriptions", b"models"):
        allow = b"GET" if sub == b"models" else b"POST"
        msg = f"use {allow.decode()}"
        ex.send_error(405, msg, "invalid_request_error", "method_not_allowed", None, [(b"allow", allow)])
    else:
        msg = f"Unknown request URL: {ex.method.decode()} {ex.path.decode('latin-1')}."
        ex.send_error(404, msg, "invalid_request_error", "not_found")


def _with_body(ing: Ingress, ex: Exchange, then: Callable[[Ingress, Exchange, Caller, bytes], None]) -> None:
    """Authorize first (no body is read for a bad key), then gather the body (bounded by the HTTP
    layer's `max_body`) and hand it over whole: these requests name their model inside it."""
    caller = authorize(ing, ex, ex.send_error)
    if caller is None:
        return
    chunks: list[bytes] = []

    def on_end() -> None:
        then(ing, ex, caller, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    ex.on_body = chunks.append
    ex.on_body_end = on_end


def _json_call(ing: Ingress, ex: Exchange, caller: Caller, body: bytes) -> None:
    try:
        model = _head_decoder.decode(body).model
    except (msgspec.DecodeError, msgspec.ValidationError):
        ex.send_error(400, _JSON_MSG, "invalid_request_error", "invalid_json")
        return
    if not model:
        ex.send_error(400, "you must provide a model parameter", "invalid_request_error", "missing_model", "model")
        return
    _send(ing, ex, caller, model, body, "application/json", {})


def _transcription(ing: Ingress, ex: Exchange, caller: Caller, body: bytes) -> None:
    try:
        parts = parse(body, boundary_of((ex.header(b"content-type") or b"").decode("latin-1")))
    except MultipartError as exc:
        ex.send_error(400, f"Invalid multipart form: {exc}", "invalid_request_error", "invalid_multipart")
        return
    params: dict[str, Any] = {}
    audio: Buffer | None = None
    content_type = ""
    for p in parts:
        if p.name == "file":
            audio, content_type = p.data, p.content_type
            if p.filename:
                params["filename"] = p.filename
                if not content_type or content_type == "application/octet-stream":
                    content_type = mimetypes.guess_type(p.filename)[0] or content_type
            continue
        name = p.name.removesuffix("[]")
        value = bytes(p.data).decode("utf-8", "replace")
        params[name] = f"{params[name]},{value}" if name in params else value  # repeated fields: a list
    model = str(params.pop("model", ""))
    if audio is None:
        ex.send_error(400, "Missing required parameter: 'file'.", "invalid_request_error", "missing_file", "file")
        return
    if not model:
        ex.send_error(400, "you must provide a model parameter", "invalid_request_error", "missing_model", "model")
        return
    params.pop("stream", None)  # transcriptions answer whole here; the SDK's default is false anyway
    _send(ing, ex, caller, model, audio, content_type, params)


def _send(
    ing: Ingress,
    ex: Exchange,
    caller: Caller,
    model: str,
    payload: Buffer,
    content_type: str,
    params: dict[str, Any],
) -> None:
    model = ing.config.openai_aliases.get(model, model)
    if "/" in model:
        ex.send_error(404, f"The model '{model}' does not exist", "invalid_request_error", "model_not_found", "model")
        return
    tenant = caller.tenant if ing.verifier is not None else ""
    try:
        head = ing.request_head(ex, model, tenant, caller.filter, content_type)
    except ValueError as exc:
        ex.send_error(400, str(exc), "invalid_request_error", "bad_request")
        return
    if params:
        head.meta.params.update(params)  # the form's fields win over X-Casola-Param- headers
    rx = ing.dispatch(ex, head, caller)
    if rx is None:
        return
    view = memoryview(payload)
    for off in range(0, len(view), _FEED):  # frame-sized pieces, never copied
        rx.on_body(view[off : off + _FEED])  # type: ignore[arg-type]
    rx.on_body_end()


def _served(ing: Ingress) -> list[str]:
    names = set(ing.config.openai_aliases)
    if ing.queue_snapshot is not None:
        names.update(m for m, s in ing.queue_snapshot().items() if s.get("workers"))
    return sorted(names)


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "casola"}


def _models(ing: Ingress, ex: Exchange) -> None:
    if authorize(ing, ex, ex.send_error) is None:
        return
    body = {"object": "list", "data": [_model_object(m) for m in _served(ing)]}
    ex.respond(200, [(b"content-type", JSON_CT)], msgspec.json.encode(body))


def _model(ing: Ingress, ex: Exchange, name: str) -> None:
    if authorize(ing, ex, ex.send_error) is None:
        return
    if name not in _served(ing):
        msg = f"The model '{name}' does not exist or you do not have access to it."
        ex.send_error(404, msg, "invalid_request_error", "model_not_found", "model")
        return
    ex.respond(200, [(b"content-type", JSON_CT)], msgspec.json.encode(_model_object(name)))
