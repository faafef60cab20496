"""The job view: what a queue node tells an ingress about one async job (SPEC §3.8.1).

The queue node builds it from the stored job; the ingress renders it as the fal status document or
the native async one, adding the URLs (only the ingress knows its own scheme and host). JSON on the
wire because it is small, read rarely (polls) and easy for raw-frame clients to use.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["JOB_VIEW_CT", "JobLog", "JobView", "decode_view", "encode_view"]

JOB_VIEW_CT: Final = "application/json"


class JobLog(msgspec.Struct, kw_only=True):
    """One line of a job's history, in fal's log shape."""

    message: str
    level: str = "INFO"
    source: str = "casola"
    timestamp: str = ""  # ISO 8601, UTC


class JobView(msgspec.Struct, kw_only=True):
    request_id: str
    model: str
    status: str  # IN_QUEUE | IN_PROGRESS | COMPLETED (failures are COMPLETED with error/error_type)
    queue_position: int | None = None  # jobs of the same model claimed before this one (queued only)
    progress: float = 0.0  # 0..1, from the worker's last checkpoint
    attempt: int = 0  # dispatches so far
    created_at: float = 0.0  # unix seconds
    started_at: float | None = None
    completed_at: float | None = None
    inference_ms: float | None = None  # `work` the worker reported for the recorded result
    error: str = ""
    error_type: str = ""
    result_content_type: str = ""
    logs: list[JobLog] = []


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JobView)


def encode_view(view: JobView) -> bytes:
    return _encoder.encode(view)


def decode_view(data: bytes | memoryview) -> JobView:
    """Raises msgspec.DecodeError (a ValueError) when `data` is not a job view."""
    return _decoder.decode(data)
