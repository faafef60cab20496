"""A whole casola deployment on loopback for tests: queue node, ingress (HTTP + raw frames) and
workers, in this process (workers may also be real processes), plus a small HTTP/1.1 client that
records when each response chunk arrived."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from casola.auth import SCOPE_RUN, SCOPE_WORKER, KeyStore
from casola.ingress.server import Ingress, IngressConfig
from casola.ingress.upstream import Upstream
from casola.queue.node import QueueConfig, QueueNode
from casola.wire import Limits
from casola.worker import Echo, WorkerConfig, WorkerRuntime
from tests.require import need_module

ROOT = Path(__file__).resolve().parents[2]


def run_uvloop(main: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    uvloop = need_module("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(main(), timeout))


class Stack:
    def __init__(self, state_dir: Path, *, ingress: dict[str, Any] | None = None, queue: dict[str, Any] | None = None):
        self.state_dir = state_dir
        self.keys = KeyStore(state_dir)
        self.api_key = self.keys.ensure_key("dev-api-key", "dev", [SCOPE_RUN], "tests")
        self.worker_key = self.keys.ensure_key("worker-key", "_workers", [SCOPE_WORKER], "tests")
        self._ingress_cfg = IngressConfig(http="127.0.0.1:0", frames="127.0.0.1:0", **(ingress or {}))
        self._queue_cfg = QueueConfig(listen="127.0.0.1:0", **(queue or {}))
        self.workers: list[WorkerRuntime] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(self) -> Stack:
        verifier = self.keys.verifier()
        self.node = QueueNode(self._queue_cfg, verifier)
        await self.node.start()
        ingress_key = self.keys.ensure_key("ingress-key", "_system", ["ingress"], "tests")
        self.upstream = Upstream([], ingress_key)
        self.upstream.add_memory(self.node.memory_dialer, "local")
        self.ingress = Ingress(self._ingress_cfg, verifier, self.upstream)
        self.ingress.queue_snapshot = self.ingress.metrics.queue_snapshot = self.node.registry.snapshot
        self.ingress.queue_signals = self.ingress.metrics.queue_signals = self.node.signals
        await self.upstream.start(wait=5)
        await self.ingress.start()
        self.http_port, self.frames_port = self.ingress.ports
        return self

    @property
    def queue_addr(self) -> str:
        return f"127.0.0.1:{self.node.port}"

    async def add_worker(
        self, capacity: int = 8, *, extra: list[Any] | None = None, limits: Limits | None = None, **kw: Any
    ) -> tuple[WorkerRuntime, Echo]:
        """An in-process worker serving echo (and the `extra` models, e.g. Steps()); `limits`: the
        receive limits it advertises."""
        echo = Echo()
        models = [echo, *(extra or [])]
        config = WorkerConfig(queue=[self.queue_addr], capacity=capacity, **kw)
        rt = WorkerRuntime(config, models, self.worker_key, limits)
        await rt.start()
        await rt.wait_registered()
        self.workers.append(rt)
        await self.wait_workers(len(self.workers) + len(self.procs))
        return rt, echo

    def spawn_worker(
        self,
        node_id: str,
        capacity: int = 8,
        *,
        models: str = "",
        queues: list[str] | None = None,
        extra: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A worker PROCESS dialling this stack's queue node (or `queues`), serving `models`
        (comma-separated built-in names; default echo); `extra`: more `casola worker` arguments."""
        env = {**os.environ, "CASOLA_WORKER_KEY": self.worker_key, "MALLOC_TOP_PAD_": "0"}
        argv = [
            sys.executable,
            "-m",
            "casola",
            "--state-dir",
            str(self.state_dir),
            "worker",
            *(a for q in (queues or [self.queue_addr]) for a in ("--queue", q)),
            "--capacity",
            str(capacity),
            "--node-id",
            node_id,
            "--log-level",
            "warning",
            *(["--models", models] if models else []),
            *(extra or []),
        ]
        proc = subprocess.Popen(argv, env=env, cwd=ROOT)
        self.procs.append(proc)
        return proc

    async def wait_workers(self, n: int, model: str = "echo", timeout: float = 15) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.node.registry.snapshot().get(model, {}).get("workers", 0) < n:
            if loop.time() > end:
                raise TimeoutError(f"{n} workers for {model} did not register")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a test may have stopped it (SIGSTOP)
                p.send_signal(signal.SIGKILL)
            p.wait(5)
        for rt in self.workers:
            await rt.stop()
        await self.ingress.stop()
        await self.upstream.stop()
        await self.node.stop()


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.chunks: list[tuple[float, bytes]] = []  # (arrival time, bytes)
        self.complete = False

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)


class HttpClient:
    """Keep-alive HTTP/1.1 client for tests: Content-Length and chunked answers, trailers included."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> HttpClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 24))

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        await self.send(method, path, body, headers)
        return await self.read_response()

    async def send(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(head.encode() + b"\r\n")
        if body:
            self.writer.write(body)
        await self.writer.drain()

    async def read_response(self) -> Response:
        r = Response()
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("closed before a response")
        r.status = int(line.split()[1])
        r.headers = await self._fields()
        loop = asyncio.get_running_loop()
        if "content-length" in r.headers:
            n = int(r.headers["content-length"])
            r.chunks.append((loop.time(), await self.reader.readexactly(n)))
            r.complete = True
        elif r.headers.get("transfer-encoding") == "chunked":
            while True:
                size_line = await self.reader.readline()
                if not size_line:
                    return r  # truncated: the server aborted the answer
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    r.trailers = await self._fields()
                    r.complete = True
                    return r
                r.chunks.append((loop.time(), await self.reader.readexactly(size)))
                await self.reader.readexactly(2)
        return r

    async def _fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            out[k.strip().lower()] = v.strip()
        return out

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def timing(header: str) -> dict[str, float]:
    """Server-Timing `a;dur=1.5, b;dur=2` -> {"a": 1.5, "b": 2.0}."""
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out
