"""`casola up` as a new user runs it: a real process with a worker process, the dev key, the banner,
one request, private state files, and a clean stop on SIGTERM. Plus the TOML configuration's errors,
and how `casola up` restarts (or does not restart) its local workers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from casola.config import ConfigError, WorkerSpec, load_config
from casola.roles import _LocalWorkers
from tests.e2e.stack import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> dict:  # type: ignore[type-arg]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "casola up exited early"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                body = json.loads(r.read())
                if body.get("models", {}).get("echo", {}).get("workers", 0) >= 1:
                    return body  # type: ignore[no-any-return]
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise TimeoutError("casola up did not become ready")


def test_casola_up_serves_echo_with_the_dev_key(tmp_path: Path) -> None:
    http, frames, queue = _free_port(), _free_port(), _free_port()
    state = tmp_path / "state"
    argv = [
        sys.executable,
        "-m",
        "casola",
        "--state-dir",
        str(state),
        "up",
        "--http",
        f"127.0.0.1:{http}",
        "--frames",
        f"127.0.0.1:{frames}",
        "--queue",
        f"127.0.0.1:{queue}",
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ})
    try:
        health = _wait_ready(f"http://127.0.0.1:{http}/healthz", proc)
        assert health["status"] == "ok"
        key = (state / "dev-api-key").read_text().strip()
        assert key.startswith("csk_") and (state / "dev-api-key").stat().st_mode & 0o077 == 0
        req = urllib.request.Request(
            f"http://127.0.0.1:{http}/v1/run/echo",
            data=b"hello casola",
            headers={"Authorization": f"Bearer {key}", "X-Casola-Trace": "1"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.read() == b"hello casola"
            assert "worker-rtt;dur=" in r.headers["Server-Timing"]
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'casola_stage_seconds_bucket{stage="queue-overhead",le="0.0005"}' in text
        assert 'casola_model_workers{model="echo"} 1.0' in text
        assert "casola_request_duration_seconds_count 1.0" in text and 'stage="total"' not in text
        assert 'casola_requests_total{model="echo",status="200"} 1.0' in text
        assert "process_resident_memory_bytes" in text and "casola_queue_requests_total 1.0" in text
        _assert_state_files_are_private(state)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    banner = err.decode()
    assert "dev-api-key" in banner and f"http://127.0.0.1:{http}/v1/run/echo" in banner


def _assert_state_files_are_private(state: Path) -> None:
    """Every file `casola up` wrote into its state directory is readable by its owner only."""
    modes = {p.relative_to(state).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in state.rglob("*") if p.is_file()}
    expected = {"jobs.db", "jobs.db-wal", "jobs.db-shm", "endpoints.json", "dev-api-key"}
    expected |= {"webhook-key.pem", "webhook-key.pub.pem", "webhook-key.pub.whpk"}
    assert expected <= set(modes), sorted(modes)
    assert {name: oct(mode) for name, mode in modes.items() if mode & 0o077} == {}


def test_casola_up_refuses_a_worker_model_it_cannot_find_before_starting_anything(tmp_path: Path) -> None:
    state, models = tmp_path / "state", tmp_path / "models"
    config = tmp_path / "casola.toml"
    config.write_text(f'models_dir = "{models}"\n[[workers]]\nmodels = ["echo"]\n[[workers]]\nmodels = ["whisperr"]\n')
    argv = [sys.executable, "-m", "casola", "--state-dir", str(state), "up", "--config", str(config)]
    argv += ["--http", f"127.0.0.1:{_free_port()}", "--frames", "", "--queue", f"127.0.0.1:{_free_port()}"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=30)
    lines = out.stderr.decode().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr.decode()[-2000:]
    assert lines[0].startswith(f"casola up: {config}: [[workers]] #2: model 'whisperr' is not built in")
    assert lines[0].endswith("available: echo, steps")
    assert not state.exists(), "casola up started something before checking its workers' models"


def test_a_worker_with_a_configuration_error_is_not_restarted(tmp_path: Path) -> None:
    """`casola worker` exits 2 for a model it cannot find (e.g. its directory removed after `casola
    up` checked it); restarting it every second would change nothing, forever."""

    async def main() -> None:
        spec = WorkerSpec(models=["gone"])
        workers = _LocalWorkers([spec], "127.0.0.1:1", tmp_path / "state", "key", str(tmp_path / "models"), "")
        workers.start()
        try:
            while not workers.procs or workers.procs[1].returncode is None:
                await asyncio.sleep(0.05)
            assert workers.procs[1].returncode == 2
            await asyncio.sleep(1.5)  # the old fixed pause was 1 s
            assert workers.starts == {1: 1}
        finally:
            await workers.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_worker_that_keeps_crashing_is_restarted_with_growing_pauses(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    script = f"import time; open({str(log)!r}, 'a').write(f'{{time.monotonic()}} '); raise SystemExit(1)"
    first, window = 0.1, 1.6  # pauses 0.1, 0.2, 0.4, 0.8: at most 5 runs in the window

    async def main() -> None:
        workers = _LocalWorkers(
            [WorkerSpec()], "127.0.0.1:1", tmp_path, "key", str(tmp_path), "",
            command=[sys.executable, "-c", script], first_delay=first,
        )  # fmt: skip
        workers.start()
        await asyncio.sleep(window)
        await workers.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
    runs = [float(line) for line in log.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert 3 <= len(runs) <= 5, (len(runs), gaps)
    for i, gap in enumerate(gaps):  # each pause at least twice the one before
        assert gap >= first * 2**i, (i, gaps)


def test_config_file_is_strict_and_clear(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[ingress]\ntrace = true\n[queue]\nmax_pending = 5\n[[workers]]\nmodels = ["echo"]\ncount = 2\n')
    cfg = load_config(good)
    assert cfg.ingress.trace and cfg.queue.max_pending == 5 and cfg.workers[0].count == 2
    assert load_config(None).ingress.http == "127.0.0.1:8000"
    typo = tmp_path / "typo.toml"
    typo.write_text("[ingress]\ntrcae = true\n")
    with pytest.raises(ConfigError, match="trcae"):
        load_config(typo)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[queue]\nmax_pending = "many"\n')
    with pytest.raises(ConfigError, match="max_pending"):
        load_config(wrong)
    with pytest.raises(ConfigError, match="invalid TOML"):
        bad = tmp_path / "bad.toml"
        bad.write_text("[ingress\n")
        load_config(bad)


def test_roles_run_as_separate_processes(tmp_path: Path) -> None:
    """`casola queue`, `casola ingress` and `casola worker` as three processes sharing a state dir."""
    http, queue = _free_port(), _free_port()
    state = str(tmp_path / "state")
    base = [sys.executable, "-m", "casola", "--state-dir", state]
    env = {**os.environ, "CASOLA_NO_MALLOC_TUNE": "1"}
    procs = [subprocess.Popen([*base, "queue", "--listen", f"127.0.0.1:{queue}"], cwd=ROOT, env=env)]
    try:
        time.sleep(0.5)
        procs.append(subprocess.Popen([*base, "worker", "--queue", f"127.0.0.1:{queue}"], cwd=ROOT, env=env))
        ingress = [
            *base,
            "ingress",
            "--http",
            f"127.0.0.1:{http}",
            "--frames",
            "",
            "--queue-node",
            f"127.0.0.1:{queue}@eu",
        ]
        procs.append(subprocess.Popen(ingress, cwd=ROOT, env=env))
        key = subprocess.run(
            [*base, "keys", "create", "--tenant", "acme"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout.split()[0]
        end = time.monotonic() + 30
        while True:
            req = urllib.request.Request(
                f"http://127.0.0.1:{http}/v1/run/echo",
                data=b"three processes",
                headers={"Authorization": f"Bearer {key}"},
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    assert r.read() == b"three processes"
                    break
            except (urllib.error.URLError, ConnectionError):  # not up yet, or no worker yet (503)
                assert time.monotonic() < end, "the three roles never served a request"
                time.sleep(0.2)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(20) == 0


def test_the_documented_config_example_is_exactly_the_defaults() -> None:
    """casola/config.py's docstring shows every key with its default: it must parse, and match."""
    import tomllib

    import msgspec

    import casola.config

    doc = casola.config.__doc__ or ""
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    parsed = msgspec.convert(tomllib.loads(example), casola.config.Config)
    assert msgspec.to_builtins(parsed) == msgspec.to_builtins(casola.config.Config())
