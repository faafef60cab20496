"""What an operator meets: `/metrics` on a standalone queue node and worker (a key asked for where
configured), JSON log lines, the CLI's version, help and validated flags, one-line errors instead of
tracebacks, the banner's `try:` naming a served model, and the README's demo script run by a
`python` that is not the virtualenv's."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from casola import __version__
from casola.auth import SCOPE_RUN, KeyStore
from casola.auth.tokens import SCOPE_METRICS
from casola.banner import banner, try_hint
from casola.cli import _parser, main
from casola.config import Config, WorkerSpec
from casola.queue.config import QueueConfig
from casola.roles import _LocalWorkers
from tests.e2e.procs import free_port
from tests.e2e.stack import ROOT

__all__: list[str] = []

ENV = {**os.environ, "CASOLA_NO_MALLOC_TUNE": "1"}


def _casola(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "casola", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _get(url: str, key: str = "") -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- /metrics of the roles alone -------------------------------------------------------------------------


def test_a_standalone_queue_node_and_worker_serve_metrics(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ks = KeyStore(state)
    _, ops_key = ks.create("ops", [SCOPE_METRICS])
    _, run_key = ks.create("dev", [SCOPE_RUN])
    queue, queue_metrics, worker_metrics = free_port(), free_port(), free_port()
    config = tmp_path / "casola.toml"
    config.write_text(
        f'metrics_key = true\n[queue]\nlisten = "127.0.0.1:{queue}"\nmetrics = "127.0.0.1:{queue_metrics}"\n'
    )
    base = [sys.executable, "-m", "casola", "--state-dir", str(state)]
    q = subprocess.Popen([*base, "queue", "--config", str(config), "--log-format", "json"], env=ENV, cwd=ROOT,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    w = subprocess.Popen([*base, "worker", "--queue", f"127.0.0.1:{queue}", "--metrics", f"127.0.0.1:{worker_metrics}",
                          "--node-id", "w-ops"], env=ENV, cwd=ROOT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{queue_metrics}/metrics"
        end = time.monotonic() + 30
        while True:
            try:
                status, text = _get(url, ops_key)
                if 'casola_model_workers{model="echo"} 1.0' in text:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < end and q.poll() is None and w.poll() is None, "no worker registered"
            time.sleep(0.2)
        assert status == 200 and "casola_queue_requests_total 0.0" in text and "process_resident_memory_bytes" in text
        assert _get(url)[0] == 401 and _get(url, run_key)[0] == 403  # metrics_key = true: a `metrics` key
        status, text = _get(f"http://127.0.0.1:{worker_metrics}/metrics")
        assert status == 200 and "casola_worker_slots 64.0" in text and 'casola_worker_model{model="echo"} 1.0' in text
        assert 'node_id="w-ops"' in text and "casola_worker_busy 0.0" in text
        post = urllib.request.Request(f"http://127.0.0.1:{worker_metrics}/metrics", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=5)
        assert refused.value.code == 405 and refused.value.headers["Allow"] == "GET, HEAD"
    finally:
        for p in (w, q):
            p.send_signal(signal.SIGTERM)
        assert w.wait(20) == 0
        _, err = q.communicate(timeout=20)
    assert q.returncode == 0
    lines = [json.loads(line) for line in err.splitlines()]  # --log-format json: every line an object
    assert any("registered" in d["msg"] for d in lines) and all(d["pid"] == q.pid for d in lines)


# -- the CLI ---------------------------------------------------------------------------------------------


def _actions(p: argparse.ArgumentParser, path: str = "casola") -> list[tuple[str, argparse.Action]]:
    out = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out += _actions(sub, f"{path} {name}")
        elif not isinstance(a, argparse._HelpAction):
            out.append((path, a))
    return out


def test_every_option_has_help_and_the_version_prints() -> None:
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in _actions(_parser()) if not a.help]
    assert missing == []
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and out.getvalue().strip() == f"casola {__version__}"


def test_log_level_and_format_are_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["up", "--log-level", "loud"], ["worker", "--log-format", "xml"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["up", "queue", "worker"])
def test_an_address_in_use_is_one_line(tmp_path: Path, role: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        args = {
            "up": ["up", "--http", taken, "--frames", "", "--queue", "127.0.0.1:0"],
            "queue": ["queue", "--listen", taken],
            "worker": ["worker", "--queue", "127.0.0.1:1", "--metrics", taken],
        }[role]
        out = _casola("--state-dir", str(tmp_path / "state"), *args, "--log-level", "warning")
    assert (out.returncode, out.stderr) == (1, f"casola {role}: cannot listen on {taken}: address already in use\n")


@pytest.mark.parametrize("role", ["up", "ingress", "queue", "worker"])
def test_an_unusable_state_dir_and_a_bad_config_are_one_line_each(tmp_path: Path, role: str) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    extra = {
        "up": ["--http", "127.0.0.1:0", "--frames", "", "--queue", "127.0.0.1:0"],
        "ingress": ["--http", "127.0.0.1:0", "--frames", ""],
        "queue": ["--listen", "127.0.0.1:0"],
        "worker": ["--queue", "127.0.0.1:1"],
    }[role]
    out = _casola("--state-dir", str(a_file / "state"), role, *extra)
    assert out.returncode == 1, out.stderr
    assert out.stderr == f"casola {role}: cannot write the state directory {a_file / 'state'}: Not a directory\n"
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\nmax_pending = 'many'\n")
    out = _casola(role, "--config", str(bad))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"casola {role}: {bad}: ") and "max_pending" in out.stderr


def test_a_bad_tls_file_and_a_bad_store_url_are_one_line_each(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    config = tmp_path / "tls.toml"
    config.write_text(f'[ingress]\ntls_cert = "{junk}"\ntls_key = "{junk}"\n')
    state = str(tmp_path / "state")
    up = ["up", "--config", str(config), "--http", "127.0.0.1:0", "--frames", "", "--queue", "127.0.0.1:0"]
    out = _casola("--state-dir", state, *up, "--log-level", "warning")
    assert out.returncode == 1 and out.stderr.startswith(f"casola up: TLS certificate {junk} / key {junk}: ")
    assert len(out.stderr.splitlines()) == 1, out.stderr
    out = _casola("--state-dir", state, "queue", "--listen", "127.0.0.1:0", "--store", "redis://x")
    assert (out.returncode, out.stderr.splitlines()) == (
        1,
        ["casola queue: unknown job store URL 'redis://x': use sqlite:///path/to/jobs.db or postgresql://..."],
    )


# -- casola up's banner and its workers ----------------------------------------------------------------


def test_the_banners_try_names_a_model_the_config_serves(tmp_path: Path) -> None:
    assert try_hint(Config())[0] == "echo"
    assert try_hint(Config(workers=[WorkerSpec(models=["steps", "echo"])]))[0] == "echo"
    model, body, note = try_hint(Config(workers=[WorkerSpec(models=["steps"])]))
    assert (model, "X-Casola-Param-steps" in body, "JSON" in note) == ("steps", True, True)
    models = tmp_path / "models"
    (models / "voice").mkdir(parents=True)
    (models / "voice" / "casola.json").write_text(json.dumps({"kind": "tts"}))
    config = Config(models_dir=str(models), workers=[WorkerSpec(models=["voice"])])
    model, body, _ = try_hint(config)
    assert model == "voice" and "-o hello.wav" in body
    queued = Config(workers=[], queue=QueueConfig(models=["later"]))
    assert try_hint(queued)[0] == "later" and "once a worker registers" in try_hint(queued)[2]


def test_the_banner_prints_the_hint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    endpoints = {"http": "http://127.0.0.1:8000", "frames": "", "queue": "127.0.0.1:7710", "loop": "uvloop"}
    banner(endpoints, tmp_path, None, try_hint(Config(workers=[WorkerSpec(models=["steps"])])))
    err = capsys.readouterr().err
    assert "http://127.0.0.1:8000/v1/run/steps" in err and "/v1/run/echo" not in err


def test_casola_up_passes_its_log_flags_to_its_workers(tmp_path: Path) -> None:
    spec = WorkerSpec()
    workers = _LocalWorkers(
        [spec], "127.0.0.1:1", tmp_path, "key", str(tmp_path), "", log_args=["--log-format", "json"]
    )
    argv = workers._argv(spec, 1)
    assert argv[argv.index("worker") :][-2:] == ["--log-format", "json"]
    assert _parser().parse_args(argv[argv.index("--state-dir") :]).log_format == "json"


# -- the README's demo script --------------------------------------------------------------------------------


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="no .venv in the checkout")
def test_the_voice_agent_script_runs_from_a_python_without_the_venvs_packages() -> None:
    """`python bench/voice_agent.py` as the README says: `python -S` sees no site-packages (no
    uvloop), as a system Python would not; the script re-runs itself in the project's .venv."""
    out = subprocess.run(
        [sys.executable, "-S", "bench/voice_agent.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: voice_agent.py")
