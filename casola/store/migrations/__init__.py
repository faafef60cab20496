"""The job store's schema, as numbered migrations per SQL dialect (SQLite and PostgreSQL).

Each migration is a tuple of statements, applied in order inside one transaction together with the
row that records its version in `casola_schema_version`; a store's `open()` applies the versions it
lacks and nothing else, so opening twice is a no-op. Both dialects carry the same version numbers
and the same tables and columns (`casola_jobs`, whose column order is `Job`'s field order, and
`casola_audits`, whose columns after `seq` are `AuditRecord`'s fields). A migration, once
released, is never edited: a change is a new version.

The SQL lives here as string constants rather than `.sql` files so that it ships with the package
(editable installs included) without package-data rules.
"""

from __future__ import annotations

from typing import Final

__all__ = ["POSTGRES", "SQLITE", "VERSION_TABLE_POSTGRES", "VERSION_TABLE_SQLITE", "latest"]

VERSION_TABLE_SQLITE: Final = (
    "CREATE TABLE IF NOT EXISTS casola_schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL)"
)
VERSION_TABLE_POSTGRES: Final = (
    "CREATE TABLE IF NOT EXISTS casola_schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL)"
)

# Partial indexes serve the three scans the store makes: the next job to claim (per model, in claim
# order), the leases to expire, and the completed jobs to purge. Idempotency keys are unique per
# tenant; the empty key means "none".
_INDEXES: Final = (
    "CREATE UNIQUE INDEX casola_jobs_idempotency ON casola_jobs (tenant, idempotency_key) WHERE idempotency_key <> ''",
    "CREATE INDEX casola_jobs_queued ON casola_jobs (model, priority DESC, created_at, seq) WHERE status = 'IN_QUEUE'",
    "CREATE INDEX casola_jobs_leases ON casola_jobs (lease_expires) WHERE status = 'IN_PROGRESS'",
    "CREATE INDEX casola_jobs_completed ON casola_jobs (completed_at) WHERE status = 'COMPLETED'",
)

_SQLITE_001: Final = (
    """CREATE TABLE casola_jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('IN_QUEUE', 'IN_PROGRESS', 'COMPLETED')),
    payload BLOB NOT NULL,
    content_type TEXT NOT NULL,
    params TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    webhook_url TEXT NOT NULL,
    priority INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    attempt INTEGER NOT NULL,
    fence INTEGER NOT NULL,
    lease_owner TEXT NOT NULL,
    lease_expires REAL,
    checkpoint BLOB,
    checkpoint_seq INTEGER NOT NULL,
    progress REAL NOT NULL,
    result BLOB,
    result_content_type TEXT NOT NULL,
    error_type TEXT NOT NULL,
    error TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL
)""",
    *_INDEXES,
)

_POSTGRES_001: Final = (
    """CREATE TABLE casola_jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('IN_QUEUE', 'IN_PROGRESS', 'COMPLETED')),
    payload BYTEA NOT NULL,
    content_type TEXT NOT NULL,
    params TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    webhook_url TEXT NOT NULL,
    priority INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    completed_at DOUBLE PRECISION,
    attempt INTEGER NOT NULL,
    fence BIGINT NOT NULL,
    lease_owner TEXT NOT NULL,
    lease_expires DOUBLE PRECISION,
    checkpoint BYTEA,
    checkpoint_seq BIGINT NOT NULL,
    progress DOUBLE PRECISION NOT NULL,
    result BYTEA,
    result_content_type TEXT NOT NULL,
    error_type TEXT NOT NULL,
    error TEXT NOT NULL,
    cancel_requested BOOLEAN NOT NULL
)""",
    *_INDEXES,
)

# Version 2: the async job life cycle. The work time reported with the result, and the webhook
# delivery state; appended in `Job`'s field order. The partial index serves `due_webhooks`: only
# completed jobs whose delivery is pending have a `webhook_next`. Rows from version 1 get the
# defaults, so their webhooks (if any) are never due: nothing says whether they were delivered.
_WEBHOOKS_INDEX: Final = (
    "CREATE INDEX casola_jobs_webhooks ON casola_jobs (webhook_next) WHERE webhook_next IS NOT NULL"
)
_SQLITE_002: Final = (
    "ALTER TABLE casola_jobs ADD COLUMN inference_ms REAL",
    "ALTER TABLE casola_jobs ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE casola_jobs ADD COLUMN webhook_next REAL",
    "ALTER TABLE casola_jobs ADD COLUMN webhook_done INTEGER NOT NULL DEFAULT 0",
    _WEBHOOKS_INDEX,
)
_POSTGRES_002: Final = (
    "ALTER TABLE casola_jobs ADD COLUMN inference_ms DOUBLE PRECISION,"
    " ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0,"
    " ADD COLUMN webhook_next DOUBLE PRECISION,"
    " ADD COLUMN webhook_done BOOLEAN NOT NULL DEFAULT FALSE",
    _WEBHOOKS_INDEX,
)

# Version 3: tenant-fair claim order and content-filter audit records.
# `vtag`, the job's virtual tag (casola.store.base), appended in `Job`'s field order; rows from
# version 2 get 0, so the jobs already queued are claimed before any submitted after the upgrade.
# The claim index `casola_jobs_queued` is rebuilt with `vtag` in the claim order (priority DESC,
# vtag, created_at, seq); two more partial indexes serve submit's tag lookups, both a min/max at
# one end of an index range: the lowest tag QUEUED per model (also a covering index for
# `queued_by_model`) and the highest per model and tenant. Partial (`WHERE status = 'IN_QUEUE'`)
# like the claim index: only queued jobs are ever looked up by tag, so running and completed jobs
# cost these indexes nothing. `casola_audits`: one row per verdict; `seq` orders records with the
# same `at`; the indexes serve `audits` (with or without a tenant) and `purge`.
_FAIR_INDEXES: Final = (
    "DROP INDEX casola_jobs_queued",
    "CREATE INDEX casola_jobs_queued ON casola_jobs (model, priority DESC, vtag, created_at, seq)"
    " WHERE status = 'IN_QUEUE'",
    "CREATE INDEX casola_jobs_queued_tags ON casola_jobs (model, vtag) WHERE status = 'IN_QUEUE'",
    "CREATE INDEX casola_jobs_tenant_tags ON casola_jobs (model, tenant, vtag) WHERE status = 'IN_QUEUE'",
)
_AUDIT_INDEXES: Final = (
    "CREATE INDEX casola_audits_at ON casola_audits (at)",
    "CREATE INDEX casola_audits_tenant ON casola_audits (tenant, at)",
)
_SQLITE_003: Final = (
    "ALTER TABLE casola_jobs ADD COLUMN vtag INTEGER NOT NULL DEFAULT 0",
    *_FAIR_INDEXES,
    """CREATE TABLE casola_audits (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    at REAL NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    policy TEXT NOT NULL,
    outcome TEXT NOT NULL,
    flagged INTEGER NOT NULL,
    label TEXT NOT NULL,
    score REAL NOT NULL,
    classifier TEXT NOT NULL,
    filter_ms REAL NOT NULL,
    before_response INTEGER NOT NULL,
    detail TEXT NOT NULL
)""",
    *_AUDIT_INDEXES,
)
_POSTGRES_003: Final = (
    "ALTER TABLE casola_jobs ADD COLUMN vtag BIGINT NOT NULL DEFAULT 0",
    *_FAIR_INDEXES,
    """CREATE TABLE casola_audits (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    id TEXT PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    policy TEXT NOT NULL,
    outcome TEXT NOT NULL,
    flagged BOOLEAN NOT NULL,
    label TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    classifier TEXT NOT NULL,
    filter_ms DOUBLE PRECISION NOT NULL,
    before_response BOOLEAN NOT NULL,
    detail TEXT NOT NULL
)""",
    *_AUDIT_INDEXES,
)

# version -> (name, statements)
SQLITE: Final[dict[int, tuple[str, tuple[str, ...]]]] = {
    1: ("initial", _SQLITE_001),
    2: ("job life cycle: inference_ms, webhook delivery", _SQLITE_002),
    3: ("tenant-fair claim order (vtag), content-filter audit records", _SQLITE_003),
}
POSTGRES: Final[dict[int, tuple[str, tuple[str, ...]]]] = {
    1: ("initial", _POSTGRES_001),
    2: ("job life cycle: inference_ms, webhook delivery", _POSTGRES_002),
    3: ("tenant-fair claim order (vtag), content-filter audit records", _POSTGRES_003),
}


def latest() -> int:
    """The newest schema version this code knows (the same for every dialect)."""
    return max(SQLITE)
