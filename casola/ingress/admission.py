"""Requests in progress at the ingress, counted per tenant and per key (DESIGN "Auth and tenancy":
admission is per tenant and per key, so a tenant that floods gets 429 while the others are served).

Three bounds, every request of every surface (HTTP sync and async, OpenAI, fal, raw frames):
- the key's own `max_inflight` claim, when it has one;
- `max_inflight_per_tenant`: no tenant holds more than this much of the ingress;
- `max_inflight` overall (memory), applied fairly: when it is reached a tenant still below its fair
  share (the limit over the tenants with requests in progress) is admitted, up to twice the limit,
  so the tenants that filled it cannot lock the others out.
A refusal is a 429 OVERLOADED whose Retry-After is the time the refused tenant's (or key's) own
requests take to drain by one, as measured: its completions per second.
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

from casola.stats import DecayingRate

__all__ = ["Admission", "Refusal", "Ticket"]

_MIN_RETRY_MS: Final = 1000  # Retry-After is whole seconds on HTTP; never advise less than one
_MAX_RETRY_MS: Final = 60_000  # a tenant that barely finishes anything is told a minute, not hours


class Ticket(NamedTuple):
    """What an admitted request holds until it ends: give it back with `Admission.release` once."""

    tenant: str
    kid: str


class Refusal(NamedTuple):
    message: str
    retry_after_ms: int


class Admission:
    __slots__ = ("_done", "_keys", "_tenants", "max_inflight", "per_tenant", "total")

    def __init__(self, max_inflight: int, per_tenant: int) -> None:
        self.max_inflight, self.per_tenant = max_inflight, per_tenant
        self.total = 0
        self._tenants: dict[str, int] = {}
        self._keys: dict[str, int] = {}
        self._done: dict[str, DecayingRate] = {}  # per tenant: completions, for Retry-After

    def admit(self, tenant: str, kid: str, key_limit: int, now: float) -> Ticket | Refusal:
        """Count one more request of `tenant` (through key `kid`, whose own limit is `key_limit`,
        0 for none), or say why not. `now`: a monotonic clock reading, seconds."""
        t = self._tenants.get(tenant, 0)
        if t >= self.per_tenant:
            return Refusal(f"tenant {tenant!r} has {t} requests in progress (its limit)", self._retry(tenant, now))
        if key_limit and (k := self._keys.get(kid, 0)) >= key_limit:
            return Refusal(f"key {kid} has {k} requests in progress (its limit)", self._retry(tenant, now))
        if self.total >= self.max_inflight and (
            self.total >= 2 * self.max_inflight or t >= self.max_inflight // max(1, len(self._tenants))
        ):
            msg = f"the ingress has {self.total} requests in progress, {t} of them tenant {tenant!r}'s"
            return Refusal(msg, self._retry(tenant, now))
        self.total += 1
        self._tenants[tenant] = t + 1
        if kid:
            self._keys[kid] = self._keys.get(kid, 0) + 1
        return Ticket(tenant, kid)

    def release(self, ticket: Ticket, now: float) -> None:
        """The request ended (any outcome)."""
        self.total -= 1
        tenant, kid = ticket
        n = self._tenants[tenant] - 1
        if n:
            self._tenants[tenant] = n
        else:
            del self._tenants[tenant]  # only tenants with requests in progress are kept
        if kid:
            k = self._keys[kid] - 1
            if k:
                self._keys[kid] = k
            else:
                del self._keys[kid]
        rate = self._done.get(tenant)
        if rate is None:
            if len(self._done) > 4 * self.max_inflight:
                self._done.clear()  # bounded: rates of tenants long gone are forgotten
            rate = self._done[tenant] = DecayingRate()
        rate.add(now)

    def in_flight(self, tenant: str) -> int:
        return self._tenants.get(tenant, 0)

    def _retry(self, tenant: str, now: float) -> int:
        """When one of the tenant's requests will have finished, by its measured completion rate."""
        rate = self._done.get(tenant)
        per_s = rate.rate(now) if rate is not None else 0.0
        if per_s <= 0:
            return _MIN_RETRY_MS
        return min(_MAX_RETRY_MS, max(_MIN_RETRY_MS, math.ceil(1000 / per_s)))
