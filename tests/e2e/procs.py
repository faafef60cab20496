"""Casola roles as real processes, for fault tests: queue nodes and workers a test can SIGKILL,
SIGSTOP and restart, an in-process ingress (`Edge`) dialling queue nodes over TCP, and a client
loop that waits for a job's outcome across queue node deaths."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from casola.auth import SCOPE_INGRESS, SCOPE_RUN, SCOPE_WORKER, KeyStore
from casola.client import Client, RequestFailed, Result
from casola.ingress.server import Ingress, IngressConfig
from casola.ingress.upstream import QueueNodeSpec, Upstream
from casola.jobview import JobView
from casola.net.errors import ConnectionLost
from casola.wire import ErrorCode
from tests.e2e.stack import ROOT

__all__ = [
    "Edge",
    "Keys",
    "Poller",
    "Procs",
    "Running",
    "casola_up",
    "free_port",
    "wait_listening",
    "wait_outcome",
    "write_queue_config",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Keys:
    """The keys of a deployment sharing `state_dir` (its processes verify with the same signing key)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.store = KeyStore(state_dir)
        self.api_key = self.store.ensure_key("dev-api-key", "dev", [SCOPE_RUN], "tests")
        self.worker_key = self.store.ensure_key("worker-key", "_workers", [SCOPE_WORKER], "tests")
        self.ingress_key = self.store.ensure_key("ingress-key", "_system", [SCOPE_INGRESS], "tests")


def write_queue_config(path: Path, *, worker_ping_timeout: float = 5.0, **jobs: float | int | str) -> Path:
    """A TOML config with `[queue] worker_ping_timeout` and `[queue.jobs]` keys (lease_s, ...)."""
    lines = ["[queue]", f"worker_ping_timeout = {worker_ping_timeout!r}", "", "[queue.jobs]"]
    for key, value in jobs.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class Procs:
    """Every process a test starts; `stop_all()` (in `finally`) continues and kills what is left."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.all: list[subprocess.Popen[bytes]] = []
        self._env = {
            **os.environ,
            "CASOLA_WORKER_KEY": keys.worker_key,
            "MALLOC_TOP_PAD_": "0",  # no re-exec for the malloc tuning
            "PYTHONUNBUFFERED": "1",
        }

    def casola(self, *args: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "casola", "--state-dir", str(self.keys.state_dir), *args]
        proc = subprocess.Popen(argv, env=self._env, cwd=ROOT)
        self.all.append(proc)
        return proc

    def queue_node(
        self,
        port: int,
        *,
        store: str,
        config: Path,
        node_id: str = "queue-1",
        region: str = "",
        models: str = "echo,steps",
    ) -> subprocess.Popen[bytes]:
        args = ["queue", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--store", store]
        args += ["--node-id", node_id, "--models", models, "--log-level", "warning"]
        if region:
            args += ["--region", region]
        return self.casola(*args)

    def worker(
        self, queues: list[str], node_id: str, *, models: str = "echo,steps", capacity: int = 8
    ) -> subprocess.Popen[bytes]:
        args = ["worker", *(a for q in queues for a in ("--queue", q)), "--models", models]
        args += ["--capacity", str(capacity), "--node-id", node_id, "--log-level", "error"]  # redials are noisy
        return self.casola(*args)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
        """SIGKILL (after SIGCONT, in case it is stopped) and reap."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout)

    def stop_all(self) -> None:
        for proc in self.all:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGKILL)
        for proc in self.all:
            proc.wait(10)


async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until something accepts TCP connections on 127.0.0.1:`port` (`proc` must stay alive)."""
    end = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the process meant to listen on {port} exited with {proc.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


class Edge:
    """An ingress in this process (raw-frame port for `Client`) dialling queue nodes over TCP."""

    def __init__(self, keys: Keys, addresses: list[str], node_id: str = "ingress") -> None:
        self.keys = keys
        specs = [QueueNodeSpec(address=a) for a in addresses]
        self.upstream = Upstream(specs, keys.ingress_key, node_id)
        config = IngressConfig(http="127.0.0.1:0", frames="127.0.0.1:0")
        self.ingress = Ingress(config, keys.store.verifier(), self.upstream)
        self.frames_port = 0

    async def start(self, wait: float = 15.0) -> Edge:
        await self.upstream.start(wait=wait)
        await self.ingress.start()
        self.frames_port = self.ingress.ports[1]
        return self

    async def client(self) -> Client:
        return await Client.connect(f"127.0.0.1:{self.frames_port}", self.keys.api_key)

    async def stop(self) -> None:
        await self.ingress.stop()
        await self.upstream.stop()


class Poller:
    """A client that reconnects when its link to the ingress is gone."""

    def __init__(self, edge_port: int, api_key: str) -> None:
        self.address, self.api_key = f"127.0.0.1:{edge_port}", api_key
        self.client: Client | None = None
        self.retries = 0  # failed polls (queue node unreachable, stream reset, ...), for reports

    async def get(self) -> Client:
        if self.client is None or not self.client._link.is_up:
            self.client = await Client.connect(self.address, self.api_key)
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


async def wait_outcome(client: Client | Poller, job_id: str, deadline: float, wait_ms: int = 5000) -> Result | JobView:
    """The job's result once it completed (its view if it completed with an error), polling across
    failures: a queue node that died or restarts answers nothing for a while; the ingress resets
    the long polls it carried (WORKER_FAILED) or has no node (NO_CAPACITY). A job the store does
    not know (JOB_NOT_FOUND) is a lost job: that is raised at once. `deadline`: time.monotonic()."""
    last: BaseException | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {job_id} did not complete in time (last error: {last!r})")
        try:
            c = await client.get() if isinstance(client, Poller) else client
            poll = c.job_result(job_id, wait_ms=max(1, min(wait_ms, int(left * 1000))))
            out = await asyncio.wait_for(poll, left + 5)
        except RequestFailed as exc:
            if exc.code == ErrorCode.JOB_NOT_FOUND:
                raise
            last = exc
        except (ConnectionLost, OSError, TimeoutError) as exc:
            last = exc
        else:
            if isinstance(out, Result) or out.status == "COMPLETED":
                return out
            continue
        if isinstance(client, Poller):
            client.retries += 1
        await asyncio.sleep(0.2)


class Running:
    """A `casola up` process of `casola_up`: its ports and the dev key."""

    def __init__(self, proc: subprocess.Popen[bytes], http: int, frames: int, key: str) -> None:
        self.proc, self.http, self.frames, self.key = proc, http, frames, key
        self.base = f"http://127.0.0.1:{http}"

    def health(self) -> dict[str, object]:
        import json

        with urllib.request.urlopen(f"{self.base}/healthz", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


@contextmanager
def casola_up(
    root: Path, config: Path, ready: Iterable[str], *, frames: bool = False, timeout: float = 90
) -> Iterator[Running]:
    """`casola up --config config` with its state in `root/state`, on free ports, once every model or
    workflow in `ready` has a worker; SIGTERM (then SIGKILL) when the block ends."""
    http, frames_port, queue = free_port(), free_port() if frames else 0, free_port()
    state = root / "state"
    argv = [sys.executable, "-m", "casola", "--state-dir", str(state), "up", "--config", str(config)]
    argv += ["--http", f"127.0.0.1:{http}", "--frames", f"127.0.0.1:{frames_port}" if frames else ""]
    argv += ["--queue", f"127.0.0.1:{queue}"]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "MALLOC_TOP_PAD_": "0"})
    try:
        up = Running(proc, http, frames_port, "")
        names, end = list(ready), time.monotonic() + timeout
        while True:
            assert proc.poll() is None, "casola up exited early"
            try:
                served = up.health().get("models", {})
                if all(served.get(m, {}).get("workers", 0) >= 1 for m in names):  # type: ignore[union-attr]
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < end, f"casola up did not serve {names} in time"
            time.sleep(0.1)
        up.key = (state / "dev-api-key").read_text().strip()
        yield up
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
