"""Log lines of every role: text for people, or JSON (one object a line) for log pipelines, each with
the request id of the request it is about.

`setup_logging(level, fmt, access)` configures the process once (casola/cli.py). A line carries a
request id when its record has one (`request_logger(log, rid).info(...)`, or `extra={"request_id":
rid}`), else when the `REQUEST_ID` context variable is set in the running context (a task per
request: `REQUEST_ID.set(rid)` at its start; protocol callbacks share one context, so they pass the
id on the record instead).

A JSON line: `{"ts": "2025-01-02T03:04:05.678Z", "level": "INFO", "logger": "casola.ingress",
"pid": 1234, "msg": "...", "request_id": "...", ...fields, "exc": "Traceback ..."}`; `fields` are a
record's `extra={"fields": {...}}` (the access log's method, path, status, ...), never overriding
the keys before them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, Final

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "REQUEST_ID",
    "JsonFormatter",
    "TextFormatter",
    "request_logger",
    "setup_logging",
]

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS: Final = ("text", "json")
ACCESS_LOGGER: Final = "casola.access"  # casola/ingress/accesslog.py writes here

REQUEST_ID: ContextVar[str] = ContextVar("casola_request_id", default="")

_HANDLER: Final = "casola"  # the name of the handler setup_logging installs
_TEXT: Final = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def _request_id(record: logging.LogRecord) -> str:
    rid = getattr(record, "request_id", "")
    return rid if isinstance(rid, str) and rid else REQUEST_ID.get()


class TextFormatter(logging.Formatter):
    """The human format, with ` request_id=<id>` at the end of a line about a request."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = _request_id(record)
        if not rid:
            return line
        head, nl, rest = line.partition("\n")  # a traceback stays below the line it belongs to
        return f"{head} request_id={rid}{nl}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line (keys above); non-JSON values in `fields` are written with str()."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if rid := _request_id(record):
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                out.setdefault(str(key), value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))


def _utc(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: what log pipelines parse without a format string."""
    whole = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((created - whole) * 1000):03d}Z"


class _RequestAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **(self.extra or {})}
        return msg, kwargs


def request_logger(logger: logging.Logger, request_id: str) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """`logger` whose every line carries `request_id` (other `extra` keys given per call are kept)."""
    return _RequestAdapter(logger, {"request_id": request_id})


def setup_logging(level: str = "info", fmt: str = "text", access: bool = False) -> None:
    """Configure this process's logging: one stderr handler in format `fmt` at `level`; the access
    log (logger `casola.access`, one line per request at the ingress) on only when `access`.

    Raises:
        ValueError: `level` is not one of LOG_LEVELS or `fmt` not one of LOG_FORMATS.
    """
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name(_HANDLER)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER]:  # ours from an earlier call only
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The access log has its own level: on, it logs whatever the process's level; off, nothing.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access else logging.WARNING)
