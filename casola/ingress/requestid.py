"""Request ids (`X-Request-Id`) and W3C Trace Context (`traceparent`, `tracestate`) at the edge.

Every answer carries `X-Request-Id`: the client's own when it is well formed (1-128 of
`A-Z a-z 0-9 . _ : -`, what nginx, Heroku and the OpenAI SDK send), else one made here. The id goes
to the worker in REQUEST metadata (SPEC §4.3 field 15) and into every log line about the request.
A made id is this process's random prefix and a counter: unique across restarts and nodes, and
cheaper than a UUID per request (no system call, no formatting beyond one hex number).

`traceparent` is checked against W3C Trace Context level 1 (§3.2) and passed on unchanged, with
`tracestate` (at most 512 bytes, the part every vendor must propagate); a malformed `traceparent`
drops both, as the recommendation says a receiver must.
"""

from __future__ import annotations

import os
import re
from typing import Final

__all__ = ["MAX_TRACESTATE", "RequestIds", "trace_context"]

_ID: Final = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# version "-" trace-id "-" parent-id "-" flags; a later version may append "-" and more fields.
_TRACEPARENT: Final = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
_PRINTABLE: Final = re.compile(rb"[\x20-\x7e]*")
_ZERO_TRACE: Final = b"0" * 32
_ZERO_PARENT: Final = b"0" * 16
MAX_TRACESTATE: Final = 512


class RequestIds:
    """Made request ids: `<12 random hex>-<counter in hex>`, one generator per ingress."""

    __slots__ = ("_n", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex() + "-"
        self._n = 0

    def new(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n:x}"

    def of(self, client_value: bytes | None) -> str:
        """The request's id: the client's, when it sent a well-formed one, else a new one."""
        if client_value is not None and _ID.fullmatch(client_value) is not None:
            return client_value.decode("ascii")
        return self.new()


def trace_context(traceparent: bytes | None, tracestate: bytes | None) -> tuple[str, str]:
    """(`traceparent`, `tracestate`) to pass on, or ("", "") when `traceparent` is missing or not
    W3C Trace Context: version ff, an all-zero trace or parent id, or version 00 with extra fields."""
    if not traceparent:
        return "", ""
    m = _TRACEPARENT.fullmatch(traceparent)
    if m is None or m[1] == b"ff" or m[2] == _ZERO_TRACE or m[3] == _ZERO_PARENT or (m[1] == b"00" and m[4]):
        return "", ""
    state = ""
    if tracestate and len(tracestate) <= MAX_TRACESTATE and _PRINTABLE.fullmatch(tracestate):
        state = tracestate.decode("ascii")
    return traceparent.decode("ascii"), state
