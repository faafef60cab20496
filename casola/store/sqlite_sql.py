"""The SQL text of the SQLite job store (`casola.store.sqlite`), one constant per statement.

Named parameters (`:id`, `:fence`, `:now`) where a statement has several, `?` otherwise. Every
statement that completes a job also makes its webhook due (`webhook_next = :now`) when it has a
`webhook_url` (the invariant in `casola.store.base`). Claims and queue positions follow the fair
claim order: priority DESC, vtag, created_at, seq. The PostgreSQL store keeps its own dialect's
text beside its code.
"""

from __future__ import annotations

from typing import Final

from casola.store.base import AUDIT_COLUMNS, JOB_COLUMNS

__all__ = [
    "AUDITS",
    "AUDITS_OF",
    "BY_ID",
    "BY_ID_AND_TENANT",
    "BY_KEY",
    "CANCEL",
    "CHECKPOINT",
    "CLAIM",
    "COLS",
    "COMPLETE",
    "COUNTS",
    "DUE_WEBHOOKS",
    "EXPIRED",
    "HOLD_WEBHOOK",
    "INSERT",
    "INSERT_AUDIT",
    "OWNED_BY",
    "POSITION",
    "PURGE",
    "PURGE_AUDITS",
    "QUEUED_BY_MODEL",
    "RENEW",
    "RUNNING_UNDER_FENCE",
    "TAKE_BACK",
    "WEBHOOK_ATTEMPTED",
]

COLS: Final = ", ".join(JOB_COLUMNS)
# The job's virtual tag (casola.store.base), computed in the INSERT from ?2 (tenant) and ?3 (model):
# 1 + the greater of the tenant's highest tag QUEUED for the model and the model's virtual clock
# (its lowest tag QUEUED - 1, or 0). Each subselect is one probe of a partial index (migration 3).
_VTAG: Final = (
    "MAX(COALESCE((SELECT MAX(vtag) FROM casola_jobs WHERE status = 'IN_QUEUE' AND model = ?3 AND tenant = ?2), 0),"
    " COALESCE((SELECT MIN(vtag) FROM casola_jobs WHERE status = 'IN_QUEUE' AND model = ?3) - 1, 0)) + 1"
)
# Takes every column but the last, vtag, as ?1 ... ?N-1 in JOB_COLUMNS order; returns the tag.
INSERT: Final = (
    f"INSERT INTO casola_jobs ({COLS})"
    f" VALUES ({', '.join(f'?{i}' for i in range(1, len(JOB_COLUMNS)))}, {_VTAG}) RETURNING vtag"
)
_SELECT: Final = f"SELECT {COLS} FROM casola_jobs"
BY_ID: Final = f"{_SELECT} WHERE id = ?"
BY_ID_AND_TENANT: Final = f"{_SELECT} WHERE id = ? AND tenant = ?"
BY_KEY: Final = f"{_SELECT} WHERE tenant = ? AND idempotency_key = ?"
RUNNING_UNDER_FENCE: Final = "id = :id AND fence = :fence AND status = 'IN_PROGRESS'"
CLAIM: Final = (
    "UPDATE casola_jobs SET status = 'IN_PROGRESS', attempt = attempt + 1, fence = fence + 1,"
    " lease_owner = ?, lease_expires = ?, started_at = COALESCE(started_at, ?)"
    " WHERE id = (SELECT id FROM casola_jobs WHERE status = 'IN_QUEUE' AND model IN ({marks})"
    f" ORDER BY priority DESC, vtag, created_at, seq LIMIT 1) RETURNING {COLS}"
)
RENEW: Final = (
    "UPDATE casola_jobs SET lease_expires = :expires, progress = COALESCE(:progress, progress)"
    f" WHERE {RUNNING_UNDER_FENCE}"
)
CHECKPOINT: Final = (
    "UPDATE casola_jobs SET lease_expires = :expires, progress = COALESCE(:progress, progress),"
    " checkpoint = CASE WHEN :seq > checkpoint_seq THEN :data ELSE checkpoint END,"
    f" checkpoint_seq = MAX(checkpoint_seq, :seq) WHERE {RUNNING_UNDER_FENCE}"
)
COMPLETE: Final = (
    "UPDATE casola_jobs SET status = 'COMPLETED', completed_at = :now, lease_expires = NULL,"
    " result = :result, result_content_type = :content_type, error_type = :error_type, error = :error,"
    " inference_ms = :inference_ms, webhook_next = CASE WHEN webhook_url <> '' THEN :now END"
    f" WHERE {RUNNING_UNDER_FENCE}"
)
# Taking a lease back: {where} picks the leases (expired ones, an owner's, or one by id and fence).
_ENDS: Final = "(attempt >= max_attempts OR cancel_requested)"
TAKE_BACK: Final = (
    f"UPDATE casola_jobs SET status = CASE WHEN {_ENDS} THEN 'COMPLETED' ELSE 'IN_QUEUE' END,"
    f" completed_at = CASE WHEN {_ENDS} THEN :now END,"
    f" lease_owner = CASE WHEN {_ENDS} THEN lease_owner ELSE '' END, lease_expires = NULL,"
    " error_type = CASE WHEN cancel_requested THEN :cancelled WHEN attempt >= max_attempts THEN :worker_error"
    " ELSE error_type END,"
    " error = CASE WHEN cancel_requested THEN 'cancelled by request' WHEN attempt >= max_attempts"
    " THEN 'gave up after ' || attempt || ' attempts: the worker died, hung or lost its connection'"
    " ELSE error END,"
    f" webhook_next = CASE WHEN {_ENDS} AND webhook_url <> '' THEN :now ELSE webhook_next END"
    f" WHERE {{where}} RETURNING {COLS}"
)
EXPIRED: Final = "status = 'IN_PROGRESS' AND lease_expires <= :now"
# substr rather than LIKE: the prefix is literal, '%' and '_' included.
OWNED_BY: Final = "status = 'IN_PROGRESS' AND substr(lease_owner, 1, length(:prefix)) = :prefix"
_STOPS: Final = "(status = 'IN_QUEUE' OR :force)"  # cancel: completes at once rather than asking
CANCEL: Final = (
    "UPDATE casola_jobs SET cancel_requested = 1,"
    f" status = CASE WHEN {_STOPS} THEN 'COMPLETED' ELSE status END,"
    f" completed_at = CASE WHEN {_STOPS} THEN :now ELSE completed_at END,"
    f" lease_expires = CASE WHEN {_STOPS} THEN NULL ELSE lease_expires END,"
    f" error_type = CASE WHEN {_STOPS} THEN :cancelled ELSE error_type END,"
    f" error = CASE WHEN {_STOPS} THEN 'cancelled by request' ELSE error END,"
    f" webhook_next = CASE WHEN {_STOPS} AND webhook_url <> '' THEN :now ELSE webhook_next END"
    f" WHERE id = :id AND status <> 'COMPLETED' AND (:tenant IS NULL OR tenant = :tenant) RETURNING {COLS}"
)
POSITION: Final = (
    "SELECT (SELECT COUNT(*) FROM casola_jobs q WHERE q.status = 'IN_QUEUE' AND q.model = j.model"
    " AND (q.priority > j.priority OR (q.priority = j.priority"
    " AND (q.vtag, q.created_at, q.seq) < (j.vtag, j.created_at, j.seq))))"
    " FROM casola_jobs j WHERE j.id = ? AND j.status = 'IN_QUEUE'"
)
PURGE: Final = "DELETE FROM casola_jobs WHERE status = 'COMPLETED' AND completed_at < ?"
PURGE_AUDITS: Final = "DELETE FROM casola_audits WHERE at < ?"
COUNTS: Final = "SELECT status, COUNT(*) FROM casola_jobs GROUP BY status"
QUEUED_BY_MODEL: Final = "SELECT model, COUNT(*) FROM casola_jobs WHERE status = 'IN_QUEUE' GROUP BY model"
# Audit records: inserted in AUDIT_COLUMNS order, a known id skipped; read oldest first.
_AUDIT_COLS: Final = ", ".join(AUDIT_COLUMNS)
INSERT_AUDIT: Final = (
    f"INSERT INTO casola_audits ({_AUDIT_COLS}) VALUES ({', '.join('?' * len(AUDIT_COLUMNS))})"
    " ON CONFLICT (id) DO NOTHING"
)
AUDITS: Final = f"SELECT {_AUDIT_COLS} FROM casola_audits WHERE at >= ? ORDER BY at, seq LIMIT ?"
AUDITS_OF: Final = f"SELECT {_AUDIT_COLS} FROM casola_audits WHERE tenant = ? AND at >= ? ORDER BY at, seq LIMIT ?"
# Webhooks: the due ones (now, limit), then each one held (until, id) in the same transaction.
# Tenants in turn, oldest first within each (rank within the tenant, then age): one tenant's backlog
# of failing receivers does not hold up another tenant's webhooks.
DUE_WEBHOOKS: Final = (
    f"SELECT {COLS} FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY webhook_next, seq) AS turn"
    " FROM casola_jobs WHERE status = 'COMPLETED' AND webhook_url <> '' AND NOT webhook_done AND webhook_next <= ?)"
    " ORDER BY turn, webhook_next, seq LIMIT ?"
)
HOLD_WEBHOOK: Final = "UPDATE casola_jobs SET webhook_next = ? WHERE id = ?"
# :done is "delivered or given up"; a job already done stays done.
WEBHOOK_ATTEMPTED: Final = (
    "UPDATE casola_jobs SET webhook_attempts = webhook_attempts + 1, webhook_done = (webhook_done OR :done),"
    " webhook_next = CASE WHEN webhook_done OR :done THEN NULL ELSE :next END"
    " WHERE id = :id AND status = 'COMPLETED' AND webhook_url <> ''"
)
