"""The error envelope every HTTP surface answers with: OpenAI's `{"error": {...}}` JSON shape.

Clients of the OpenAI API (and most SDKs) parse this shape on any non-2xx status, so the edge uses it
for its own errors too (limits, timeouts, parse failures) as well as for the app layer's.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["JSON_CT", "error_body"]

JSON_CT: Final = b"application/json"


class _Detail(msgspec.Struct, gc=False):
    message: str
    type: str
    param: str | None
    code: str | None


class _Envelope(msgspec.Struct, gc=False):
    error: _Detail


_ENCODER: Final = msgspec.json.Encoder()


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """Encode an error in OpenAI's shape.

    Args:
        message: human-readable text.
        type: the error class, e.g. "invalid_request_error", "server_error".
        code: a machine-readable code, e.g. "request_too_large"; null when None.
        param: the offending parameter; null when None.

    Returns:
        The JSON bytes `{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`.

    Raises:
        Nothing: the fields are plain strings.
    """
    return _ENCODER.encode(_Envelope(_Detail(message, type, param, code)))
