"""CORS (the Fetch standard's cross-origin checks) and Timing-Allow-Origin for browser callers.

A page on an origin listed in `[ingress] cors_origins` (exact `scheme://host[:port]`, or `"*"`) may
call every route with an API key: the preflight (`OPTIONS` with `Access-Control-Request-Method`) is
answered 204 with the methods and the request headers casola reads, and every answer to that origin,
errors included, says which headers the page may read (`Server-Timing`, `X-Request-Id`,
`Retry-After`) and lets it read the timing (`Timing-Allow-Origin`; without it a browser shows zero
`PerformanceServerTiming` entries cross-origin). No origin is allowed by default. Keys go in the
`Authorization` header, never in cookies, so credentialed requests (`Allow-Credentials`) are not offered.

The answer headers of each configured origin are joined once, at start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from casola.ingress.exchange import Exchange

__all__ = ["ALLOWED_HEADERS", "EXPOSED_HEADERS", "METHODS", "Cors"]

METHODS: Final = b"GET, HEAD, POST, PUT, DELETE"
# Request headers a page may send: what casola reads, and what the OpenAI and fal SDKs add in a browser.
ALLOWED_HEADERS: Final = frozenset(
    b"authorization content-type accept idempotency-key x-request-id traceparent tracestate prefer".split()
)
_ALLOWED_PREFIXES: Final = (b"x-casola-", b"x-fal-", b"x-stainless-", b"openai-")
EXPOSED_HEADERS: Final = b"server-timing, x-request-id, retry-after"
MAX_AGE: Final = b"600"  # seconds a browser may keep a preflight's answer (Chromium caps it at 7200)


class Cors:
    """The ingress's cross-origin policy: which origins, and the header lines each one gets (joined
    once, at start: the configured origins are all there are)."""

    __slots__ = ("_denied", "_lines", "_star", "timing_any")

    def __init__(self, origins: Sequence[str], timing_allow_origin: str = "") -> None:
        # `[ingress] timing_allow_origin` (e.g. "*"): timing readable by those origins, CORS or not.
        tao = timing_allow_origin.encode()
        self.timing_any = b"Timing-Allow-Origin: %b\r\n" % tao if tao else b""
        listed = [o.rstrip("/").encode() for o in origins if o != "*"]
        star = "*" in origins
        # Per-origin answers differ by Origin: caches must know (RFC 9110 §12.5.5).
        vary = b"Vary: Origin\r\n" if listed and not star else b""
        self._lines = {o: _allowed(o, vary) for o in listed}
        self._star = _allowed(b"*", b"") if star else None
        self._denied = vary + self.timing_any  # another origin: no CORS, but caches are told

    def allows(self, origin: bytes) -> bool:
        return self._star is not None or origin in self._lines

    def lines(self, origin: bytes | None) -> bytes:
        """The header lines (CRLF-ended) every answer to a request with this `Origin` carries."""
        if origin is None:
            return self.timing_any
        got = self._lines.get(origin) or self._star
        return self._denied if got is None else got

    def preflight(self, ex: Exchange, origin: bytes | None) -> None:
        """Answer `OPTIONS`: a preflight from an allowed origin gets 204 and what it may send; one from
        another origin gets 403 saying so; a plain OPTIONS (no preflight) gets 204 and `Allow`."""
        method = ex.header(b"access-control-request-method")
        if origin is None or method is None:
            return ex.respond(204, [(b"allow", METHODS + b", OPTIONS")])
        if not self.allows(origin):
            return ex.send_error(
                403,
                f"origin {origin.decode('latin-1')!r} may not call this API from a browser "
                "(not in [ingress] cors_origins)",
                "invalid_request_error",
                "origin_not_allowed",
            )
        asked = ex.header(b"access-control-request-headers") or b""
        granted = b", ".join(h for h in (p.strip().lower() for p in asked.split(b",")) if h and _may_send(h))
        headers = [(b"access-control-allow-methods", METHODS), (b"access-control-max-age", MAX_AGE)]
        if granted:
            headers.append((b"access-control-allow-headers", granted))
        ex.respond(204, headers)


def _allowed(origin: bytes, vary: bytes) -> bytes:
    """The answer header lines for an allowed origin (`*`: any)."""
    return b"".join(
        [
            b"Access-Control-Allow-Origin: %b\r\n" % origin,
            b"Access-Control-Expose-Headers: %b\r\n" % EXPOSED_HEADERS,
            b"Timing-Allow-Origin: %b\r\n" % origin,
            vary,
        ]
    )


def _may_send(name: bytes) -> bool:
    return name in ALLOWED_HEADERS or name.startswith(_ALLOWED_PREFIXES)
