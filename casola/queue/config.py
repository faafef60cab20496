"""The queue node's configuration (`[queue]`, with `[queue.jobs]` and `[queue.filter]`): plain
values that every part of the node reads; it imports none of them."""

from __future__ import annotations

import msgspec

from casola.filter import FilterConfig
from casola.net.outbound import OutboundPolicy
from casola.opsmetrics import split_address

__all__ = ["JobsConfig", "QueueConfig"]


class JobsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    store: str = ""  # sqlite:///path.db or postgresql://...; "" = `casola up`'s <state_dir>/jobs.db
    lease_s: float = 30.0  # a worker silent this long loses its job (HEARTBEATs renew)
    max_attempts: int = 3  # dispatches per job; then it completes with error_type "worker_error"
    retention_s: float = 7 * 86400.0  # completed jobs are deleted after this
    sweep_interval: float = 1.0  # expired leases, webhooks due, other nodes' submits
    max_input: int = 64 * 1024 * 1024  # bytes of one job's input
    max_result: int = 64 * 1024 * 1024  # bytes of one job's result
    max_wait_ms: int = 30_000  # longest long poll
    webhook_key: str = ""  # Ed25519 key signing webhooks; "" = <state_dir>/webhook-key.pem
    webhook_attempts: int = 8


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
