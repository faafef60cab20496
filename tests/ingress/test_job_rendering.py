"""The pure parts of the job surfaces: fal's status document, the native job document, the HTTP
status of a failed job, and what the edge reads from headers."""

from __future__ import annotations

import json

import msgspec

from casola.ingress.asyncapi import job_document
from casola.ingress.fal import status_document
from casola.ingress.jobs import error_status
from casola.jobview import JobLog, JobView

URLS = {"response_url": "https://h/o/a/requests/r1", "status_url": "https://h/o/a/requests/r1/status"}


def _view(**kw: object) -> JobView:
    return JobView(request_id="r1", model="echo", **kw)  # type: ignore[arg-type]


def test_fal_status_of_a_queued_job_has_its_position_and_the_logs_key() -> None:
    doc = status_document(_view(status="IN_QUEUE", queue_position=4), URLS, logs=False)
    assert doc == {"status": "IN_QUEUE", "request_id": "r1", **URLS, "queue_position": 4, "logs": None}


def test_fal_status_in_progress_carries_logs_only_when_asked() -> None:
    view = _view(status="IN_PROGRESS", logs=[JobLog(message="started", timestamp="t")])
    assert status_document(view, URLS, logs=False)["logs"] is None
    logs = msgspec.json.decode(msgspec.json.encode(status_document(view, URLS, logs=True)))["logs"]
    assert "metrics" not in status_document(view, URLS, logs=True)
    assert logs == [{"message": "started", "level": "INFO", "source": "casola", "timestamp": "t"}]


def test_fal_status_of_a_completed_job_has_metrics_in_seconds() -> None:
    doc = status_document(_view(status="COMPLETED", inference_ms=1500.0), URLS, logs=False)
    assert doc["metrics"] == {"inference_time": 1.5} and "error" not in doc and "queue_position" not in doc
    assert status_document(_view(status="COMPLETED"), URLS, logs=False)["metrics"] == {}


def test_a_failed_job_is_completed_with_error_and_error_type() -> None:
    doc = status_document(_view(status="COMPLETED", error="boom", error_type="worker_error"), URLS, logs=False)
    assert (doc["status"], doc["error"], doc["error_type"]) == ("COMPLETED", "boom", "worker_error")
    doc = status_document(_view(status="COMPLETED", error_type="cancelled"), URLS, logs=False)
    assert doc["error"] and doc["error_type"] == "cancelled"


def test_native_job_document_is_the_view_plus_urls() -> None:
    doc = json.loads(job_document(_view(status="IN_QUEUE", queue_position=0), "https://h"))
    assert doc["request_id"] == "r1" and doc["status"] == "IN_QUEUE" and doc["queue_position"] == 0
    assert doc["status_url"] == "https://h/v1/jobs/r1"
    assert doc["response_url"] == "https://h/v1/jobs/r1/result" and doc["cancel_url"] == "https://h/v1/jobs/r1/cancel"


def test_failed_job_statuses_follow_the_error_table() -> None:
    assert error_status("worker_error") == 502
    assert error_status("invalid_request_error") == 400
    assert error_status("server_error") == 500  # INTERNAL's, not SHUTTING_DOWN's 503
    assert error_status("timeout_error") == 504
    assert error_status("content_policy_violation") == 400
    assert error_status("cancelled") == 400  # not 499: the result request itself was fine
    assert error_status("worker_failed") == 502  # a code's name works too
    assert error_status("something-newer") == 500
