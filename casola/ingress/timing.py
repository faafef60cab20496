"""Server-Timing (DESIGN "Timing users can see"): stage durations in milliseconds, µs precision.

The queue node reports `queue-overhead`, `wait`, `worker-rtt` and the worker's `work`; the ingress
adds `upload` (the client's time sending its body) and its own residence from the request head's first
byte, minus the upload and the time the queue node had the request. The header value is built by hand
(one join) because it is on every traced response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["STAGES", "server_timing"]

# The stages, in the order they appear: the ingress's own, then the queue node's in the order it
# reports them (queue-overhead, wait, worker-rtt, work, then the content filter's).
STAGES: Final = ("upload", "ingress", "queue-overhead", "wait", "worker-rtt", "work", "filter")
# A negative duration means the stage had not finished when the answer went out (the content filter
# racing a response that won): rendered `filter;desc="pending"`.


def server_timing(ingress_ms: float, upstream: Mapping[str, float], upload_ms: float = 0.0) -> bytes:
    """`upload;dur=897.1, ingress;dur=0.120, queue-overhead;dur=0.041, ...` as header-value bytes;
    `upload` (the client sending its body after its head) only when above zero."""
    parts = (
        [f"upload;dur={upload_ms:.3f}", f"ingress;dur={ingress_ms:.3f}"]
        if upload_ms > 0
        else [f"ingress;dur={ingress_ms:.3f}"]
    )
    for name, v in upstream.items():  # the queue node sends them in STAGES order
        if name == "ingress":
            continue
        parts.append(f"{name};dur={v:.3f}" if v >= 0 else f'{name};desc="pending"')
    return ", ".join(parts).encode()
