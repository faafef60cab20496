"""The access log: one line per request at the ingress, off by default (`access_log = true` or
`casola up/ingress --access-log`), on the `casola.access` logger (casola/logs.py formats it as
text or JSON).

Text: `POST /v1/run/echo 200 0.843ms model=echo tenant=dev peer=127.0.0.1:50412 request_id=...`.
JSON: the same line as `msg`, plus `method`, `path`, `status`, `duration_ms`, `model`, `tenant`,
`peer` and `request_id` as their own keys. A path is what the client sent: bytes outside printable
ASCII (and `"`) are percent-encoded, so a request cannot forge or split a log line.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

from casola.logs import ACCESS_LOGGER

__all__ = ["ACCESS", "access_fields", "access_line", "log_access"]

ACCESS: Final = logging.getLogger(ACCESS_LOGGER)
if ACCESS.level == logging.NOTSET:  # off until setup_logging(access=True), whatever the root's level
    ACCESS.setLevel(logging.WARNING)

_UNSAFE: Final = re.compile(rb'[^\x21-\x7e]|"|%(?![0-9A-Fa-f]{2})')
_MAX_PATH: Final = 2048  # characters of a path kept in a line (the HTTP listener allows 8 KiB)


def _safe(raw: bytes) -> str:
    return _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], raw[:_MAX_PATH]).decode("ascii")


def access_fields(
    method: bytes,
    path: bytes,
    status: int,
    duration_s: float,
    *,
    model: str = "",
    tenant: str = "",
    peer: str = "",
    request_id: str = "",
) -> dict[str, Any]:
    """The fields of one access-log record (empty strings are left out)."""
    out: dict[str, Any] = {
        "method": _safe(method),
        "path": _safe(path),
        "status": status,
        "duration_ms": round(duration_s * 1000, 3),
    }
    for key, value in (("model", model), ("tenant", tenant), ("peer", peer), ("request_id", request_id)):
        if value:
            out[key] = _safe(value.encode("utf-8", "replace"))
    return out


def access_line(fields: dict[str, Any]) -> str:
    """The text of one access-log record from `access_fields(...)` (without the request id: the
    log formatter adds it)."""
    extra = "".join(f" {k}={fields[k]}" for k in ("model", "tenant", "peer") if k in fields)
    return f"{fields['method']} {fields['path']} {fields['status']} {fields['duration_ms']:.3f}ms{extra}"


def log_access(
    method: bytes,
    path: bytes,
    status: int,
    duration_s: float,
    *,
    model: str = "",
    tenant: str = "",
    peer: str = "",
    request_id: str = "",
) -> None:
    """Write one access-log line when the access log is on; about 0.1 µs when it is off.

    Args:
        method, path: the request's (`Exchange.method`, `Exchange.path`: bytes, path without the query).
        status: the HTTP status answered (499: the client went away first).
        duration_s: from the request head's arrival to the answer's end (`perf_counter() - rx.t0`).
        model, tenant, peer, request_id: what is known of the request ("" = left out).

    Raises:
        Nothing.
    """
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    fields = access_fields(
        method, path, status, duration_s, model=model, tenant=tenant, peer=peer, request_id=request_id
    )
    ACCESS.info(access_line(fields), extra={"fields": fields, "request_id": fields.get("request_id", "")})
