"""Log lines (casola.logs) and the access log (casola.ingress.accesslog): JSON with the request id,
the text format naming it too, and an access log that is off unless asked for."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from casola.ingress.accesslog import ACCESS, access_fields, access_line, log_access
from casola.logs import REQUEST_ID, JsonFormatter, TextFormatter, request_logger, setup_logging

__all__: list[str] = []


def _record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("casola.test", logging.WARNING, __file__, 1, msg, args or ("world",), None)
    rec.__dict__.update(extra)
    return rec


def test_a_json_line_carries_the_request_id_and_fields() -> None:
    line = JsonFormatter().format(_record(request_id="r-1", fields={"status": 200, "msg": "not over msg"}))
    doc = json.loads(line)
    assert doc["msg"] == "hello world" and doc["level"] == "WARNING" and doc["logger"] == "casola.test"
    assert doc["request_id"] == "r-1" and doc["status"] == 200 and doc["ts"].endswith("Z")
    assert "\n" not in line


def test_the_request_id_comes_from_the_context_when_the_record_has_none() -> None:
    token = REQUEST_ID.set("ctx-7")
    try:
        assert json.loads(JsonFormatter().format(_record()))["request_id"] == "ctx-7"
        assert TextFormatter().format(_record()).endswith("hello world request_id=ctx-7")
    finally:
        REQUEST_ID.reset(token)
    assert "request_id" not in json.loads(JsonFormatter().format(_record()))


def test_an_exception_stays_inside_its_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("casola", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


@pytest.fixture
def logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, access = list(root.handlers), root.level, ACCESS.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    ACCESS.setLevel(access)


def test_request_logger_and_the_access_log_in_json(capsys: pytest.CaptureFixture[str], logging_restored: None) -> None:
    setup_logging("info", "json")
    request_logger(logging.getLogger("casola.ingress"), "abc").info("answered")
    log_access(b"POST", b"/v1/run/echo", 200, 0.0012, model="echo", request_id="abc")  # off by default
    setup_logging("warning", "json", access=True)  # the access log does not depend on the level
    log_access(b"POST", b"/v1/run/echo", 200, 0.0012, model="echo", tenant="dev", request_id="abc")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(d["logger"], d["msg"]) for d in lines] == [
        ("casola.ingress", "answered"),
        ("casola.access", "POST /v1/run/echo 200 1.200ms model=echo tenant=dev"),
    ]
    assert lines[0]["request_id"] == "abc" and lines[1]["request_id"] == "abc"
    assert (lines[1]["method"], lines[1]["path"], lines[1]["status"], lines[1]["duration_ms"]) == (
        "POST",
        "/v1/run/echo",
        200,
        1.2,
    )


def test_setup_logging_refuses_unknown_levels_and_formats(logging_restored: None) -> None:
    with pytest.raises(ValueError, match="log level 'loud'"):
        setup_logging("loud")
    with pytest.raises(ValueError, match="log format 'xml'"):
        setup_logging("info", "xml")


def test_a_path_cannot_forge_an_access_line() -> None:
    fields = access_fields(b"GET", b'/a b"\r\n200 fake\x1b%zz%41', 404, 0.0)
    assert fields["path"] == "/a%20b%22%0D%0A200%20fake%1B%25zz%41"
    assert access_line(fields) == f"GET {fields['path']} 404 0.000ms"
