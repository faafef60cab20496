"""Server-Timing (DESIGN "Timing users can see"): stage durations in milliseconds, µs precision.

The queue node reports `queue-overhead`, `wait`, `worker-rtt` and the worker's `work`; the ingress
adds its own residence minus the time it waited on the queue node. The header value is built by hand
(one join) because it is on every traced response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["STAGES", "server_timing"]

# The stages, in the order they appear: the ingress's own, then the queue node's in the order it
# reports them (queue-overhead, wait, worker-rtt, work, then the content filter's).
STAGES: Final = ("ingress", "queue-overhead", "wait", "worker-rtt", "work", "filter")
# A negative duration means the stage had not finished when the answer went out (the content filter
# racing a response that won): rendered `filter;desc="pending"`.


def server_timing(ingress_ms: float, upstream: Mapping[str, float]) -> bytes:
    """`ingress;dur=0.120, queue-overhead;dur=0.041, ...` as header-value bytes."""
    parts = [f"ingress;dur={ingress_ms:.3f}"]
    for name, v in upstream.items():  # the queue node sends them in STAGES order
        if name == "ingress":
            continue
        parts.append(f"{name};dur={v:.3f}" if v >= 0 else f'{name};desc="pending"')
    return ", ".join(parts).encode()
