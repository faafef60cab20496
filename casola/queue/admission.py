"""Whether a sync request may wait for a slot, and what a refusal says (DESIGN "Capacity pools and
scheduling": one that cannot start in time is refused at once with Retry-After; "Auth and tenancy":
admission is per tenant, so one tenant's flood gets 429 while the others are served).

A request may wait when
- its tenant has fewer than `max_pending_per_tenant` waiting for the model;
- by the measured drain rate it would start before the earlier of its deadline and its wait bound
  (`sync_wait_ms`, the default "start by" of a request that names no deadline);
- the model's line (`max_pending`) has room, or a tenant with a longer line than its own gives up
  its newest request for it (longest line first: a full line never refuses a tenant that waits less
  than another).
Every refusal is OVERLOADED (429, retryable) with Retry-After from the drain rate, and its message
counts the tenant's own requests.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

from casola.wire import ErrorCode

if TYPE_CHECKING:
    from casola.queue.config import QueueConfig
    from casola.queue.records import Call, ModelEntry

__all__ = ["Refusal", "full", "refusal", "retry_after"]


class Refusal(NamedTuple):
    code: int
    message: str
    retry_after_ms: int
    late: bool = False  # refused for its deadline (a statistic apart)


def refusal(call: Call, model: ModelEntry, cfg: QueueConfig, now: float) -> Refusal | None:
    """Why `call` may not wait for a slot of `model`, or None: it may (if the line has room)."""
    line, tenant = model.pending, call.meta.tenant
    own = line.depth(tenant)
    if own >= cfg.max_pending_per_tenant:
        msg = f"model {model.name!r}: tenant {tenant!r} already has {own} requests waiting for a slot (its limit)"
        return Refusal(ErrorCode.OVERLOADED, msg, retry_after(model, tenant, cfg))
    until = call.start_limit
    if until:
        est = model.signals.wait_estimate(line.ahead(tenant), model.slots)
        left = until - now
        if est is not None and est > left:
            what = "its deadline" if until == call.deadline else "the longest wait for a slot"
            msg = (
                f"model {model.name!r}: tenant {tenant!r} has {own} requests waiting, and a slot would free"
                f" in about {est * 1000:.0f} ms, after {what} ({left * 1000:.0f} ms left)"
            )
            return Refusal(ErrorCode.OVERLOADED, msg, max(1, math.ceil((est - left) * 1000)), late=True)
    return None


def full(model: ModelEntry, tenant: str, cfg: QueueConfig) -> Refusal:
    """The model's line is full and `tenant`'s part of it is as long as any other tenant's."""
    own = model.pending.depth(tenant)
    msg = (
        f"model {model.name!r}: its line is full ({len(model.pending)} waiting) and tenant {tenant!r}"
        f" has {own} of them, as many as any"
    )
    return Refusal(ErrorCode.OVERLOADED, msg, retry_after(model, tenant, cfg))


def retry_after(model: ModelEntry, tenant: str, cfg: QueueConfig) -> int:
    """Milliseconds until the tenant's next request would get a slot, by the drain rate (the
    configured default before a service time is measured)."""
    est = model.signals.wait_estimate(model.pending.ahead(tenant), model.slots)
    return math.ceil(est * 1000) if est else cfg.retry_after_ms
