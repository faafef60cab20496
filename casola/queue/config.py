"""The queue node's configuration (`[queue]`, with `[queue.jobs]` and `[queue.filter]`)."""

from __future__ import annotations

import msgspec

from casola.filter import FilterConfig
from casola.net.outbound import OutboundPolicy
from casola.opsmetrics import split_address
from casola.queue.jobs import JobsConfig

__all__ = ["QueueConfig"]


class QueueConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:7710"  # frames, for ingresses and workers
    region: str = "local"
    node_id: str = "queue-1"
    max_pending: int = 1024  # requests waiting for a slot, per model; beyond: OVERLOADED (429)
    max_pending_per_tenant: int = 256  # of those, one tenant's (one flood cannot fill the line)
    retry_after_ms: int = 1000  # advertised with NO_CAPACITY, and with OVERLOADED before any measurement
    deadlines: dict[str, int] = {}  # per model: deadline (ms) of sync requests that name none
    # The longest a sync request waits for a slot (ms), deadline or not: refused at once (429) when the
    # drain rate says it would wait longer, and 429 if it still waits then. 0: no bound.
    sync_wait_ms: int = 10_000
    lend_idle_sync: bool = False  # async jobs may take a sync worker's free slots (beyond lend_reserve)
    lend_reserve: int = 1  # slots per sync worker kept free for sync arrivals while lending
    models: list[str] = []  # models known before any worker registers (else: unknown -> 404)
    worker_ping_timeout: float = 5.0  # a worker that answers no PING this long is gone
    # CIDR networks outbound calls (webhooks) may reach although not public, e.g. ["10.1.0.0/16"]
    outbound_allow: list[str] = []
    # `casola queue` alone: GET /metrics on this host:port ("" = off; `casola up` has the ingress's)
    metrics: str = ""
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)  # async jobs ([queue.jobs])
    filter: FilterConfig = msgspec.field(default_factory=FilterConfig)  # content filtering ([queue.filter])

    def __post_init__(self) -> None:
        # A bad value fails at load, naming its key (msgspec reports a ValueError as a ValidationError).
        OutboundPolicy(self.outbound_allow)
        if not 0 < (t := self.worker_ping_timeout) < float("inf"):  # NaN too: no worker would ever be dropped
            raise ValueError(f"worker_ping_timeout must be a positive number of seconds, not {t}")
        if self.metrics:
            try:
                split_address(self.metrics)
            except ValueError as exc:
                raise ValueError(f"metrics: {exc}") from None
