"""Async job stores: the `JobStore` interface and `open_store`, which picks a backend by URL.

`sqlite:///abs/path/jobs.db` (or `sqlite://rel/path.db`, `sqlite://:memory:`) is the embedded
default for one queue node; `postgresql://user@host:port/db[?schema=name]` is shared by several.
"""

from __future__ import annotations

from casola.store.base import CANCELLED, WORKER_ERROR, AuditRecord, Job, JobStatus, JobStore, NewJob, StoreError

__all__ = [
    "CANCELLED",
    "WORKER_ERROR",
    "AuditRecord",
    "Job",
    "JobStatus",
    "JobStore",
    "NewJob",
    "StoreError",
    "open_store",
]


def open_store(url: str) -> JobStore:
    """The store a URL names, not yet opened (call `await store.open()`).

    Raises:
        ValueError: the URL's scheme is neither sqlite nor postgresql, or it names no path.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "sqlite":
        if not rest:
            raise ValueError("a sqlite store URL needs a path: sqlite:///path/to/jobs.db or sqlite://:memory:")
        from casola.store.sqlite import SqliteJobStore

        return SqliteJobStore(rest)
    if sep and scheme in ("postgresql", "postgres"):
        from casola.store.postgres import PostgresJobStore  # imports asyncpg only when used

        return PostgresJobStore(url)
    raise ValueError(f"unknown job store URL {url!r}: use sqlite:///path/to/jobs.db or postgresql://...")
