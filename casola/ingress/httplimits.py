"""The limits of one HTTP/1.1 server connection (casola/ingress/http.py): sizes, counts, timeouts, and
the error a request that breaks one (or HTTP itself) is answered with."""

from __future__ import annotations

import msgspec

__all__ = ["HttpLimits", "RequestError"]


class HttpLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-connection limits; every one has a status and a precedent.

    Attributes:
        max_head: request line + headers (+ trailers), bytes -> 431. nginx's default is 4 x 8 KiB
            buffers, node's --max-http-header-size is 16 KiB.
        max_url: request target, bytes -> 414. nginx: one 8 KiB buffer; many CDNs use 8 KiB.
        max_headers: header fields -> 431. Apache's LimitRequestFields and h11 use 100.
        max_body: Content-Length above it -> 413 before reading; chunked bodies cumulatively -> 413 + close.
            64 MiB fits a few minutes of 16 kHz audio as WAV, or a large prompt with images.
        idle_timeout: keep-alive connection with no request in progress -> closed quietly (uvicorn 5 s,
            nginx 75 s).
        head_timeout: a request head must complete within this from its first byte -> 408 + close
            (nginx client_header_timeout 60 s; shorter here against slowloris).
        body_timeout: no body bytes for this long while the app waits for the body -> 408 + close
            (nginx client_body_timeout 60 s).
        send_timeout: the client takes no response bytes for this long while some wait for it (the
            write buffer stays above write_high) -> the connection is aborted, what was buffered for
            it dropped (nginx send_timeout 60 s).
        max_pipeline: requests parsed ahead of the one being answered; beyond, reading pauses.
        write_high, write_low: transport write-buffer marks (asyncio and uvloop defaults differ).
    """

    max_head: int = 16 * 1024
    max_url: int = 8 * 1024
    max_headers: int = 100
    max_body: int = 64 * 1024 * 1024
    idle_timeout: float = 30.0
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    max_pipeline: int = 16
    write_high: int = 1024 * 1024
    write_low: int = 256 * 1024

    def __post_init__(self) -> None:
        if min(self.max_head, self.max_url, self.max_headers, self.max_pipeline) < 1 or self.max_body < 0:
            raise ValueError("HTTP limits must be positive")
        if min(self.idle_timeout, self.head_timeout, self.body_timeout, self.send_timeout) <= 0:
            raise ValueError("HTTP timeouts must be positive")
        if not 0 <= self.write_low <= self.write_high:
            raise ValueError("need 0 <= write_low <= write_high")


class RequestError(Exception):
    """The request broke HTTP or a limit; what `on_abort` gets when that happens mid-body.

    Attributes:
        status: the HTTP status answered (or that would have been, had the response not started).
        code: the error envelope's code, e.g. "request_too_large".
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
