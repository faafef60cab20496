"""The one error of a session's protocol: a client event it refuses."""

from __future__ import annotations

__all__ = ["SessionFault"]


class SessionFault(Exception):
    """A client event the session refuses (bad field, unknown item): an error event, the session goes on."""

    def __init__(self, message: str, code: str = "invalid_request_error", param: str = "") -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param
