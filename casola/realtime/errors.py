"""A session's errors: a client event it refuses, and how a wire error is worded in its events."""

from __future__ import annotations

from typing import Any

from casola.wire import error_info, error_name

__all__ = ["SessionFault", "wire_error"]


class SessionFault(Exception):
    """A client event the session refuses (bad field, unknown item): an error event, the session goes on."""

    def __init__(self, message: str, code: str = "invalid_request_error", param: str = "") -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def wire_error(code: int, message: str, retry_after_ms: int = 0, param: str = "") -> dict[str, Any]:
    """An `error` object for a wire error code: the HTTP envelope's fields (type, code, param) and
    its retry hints (what `x-should-retry` and `Retry-After` would say)."""
    info = error_info(code)
    err: dict[str, Any] = {"message": message, "type": info.type, "param": param or None,
                           "code": error_name(code).lower(), "retryable": info.retryable}  # fmt: skip
    if retry_after_ms:
        err["retry_after_ms"] = retry_after_ms
    return err
