"""`casola up` as a bench subject: a process on free loopback ports with the TOML a bench gives,
ready once its dev key exists and echo answers; plus the percentile helper the benches share."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from floor import ROOT, BenchError, Procs, free_port

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from casola.client import Client

__all__ = ["Up", "pct"]


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if xs else None


class Up:
    """`python -m casola up` with `toml` after its listeners (`[ingress]` http/frames and `[queue]`
    listen are set here; `toml` goes on with more `[queue]` keys or later sections; `top` holds
    top-level keys such as `models_dir`, which TOML wants before any section)."""

    def __init__(self, procs: Procs, tmp: Path, toml: str, top: str = "") -> None:
        self.http, self.frames, self.queue = free_port(), free_port(), free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        state, config = tmp / "state", tmp / "casola.toml"
        state.mkdir()
        config.write_text(
            f'{top}[ingress]\nhttp = "127.0.0.1:{self.http}"\nframes = "127.0.0.1:{self.frames}"\n'
            f'[queue]\nlisten = "127.0.0.1:{self.queue}"\n{toml}'
        )
        self.name = f"casola-up-{uuid.uuid4().hex[:6]}"
        cmd = [sys.executable, "-m", "casola", "up", "--config", str(config), "--state-dir", str(state)]
        self.procs = procs
        self.proc = procs.start(self.name, cmd)
        self.state = state
        self.address = f"127.0.0.1:{self.frames}"

    async def ready(self, timeout: float = 30.0) -> Client:
        """A client of the dev key once echo answers through it (the caller closes it)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"casola up exited with {self.proc.returncode}\n{self.procs.log(self.name)}")
            key_file = self.state / "dev-api-key"
            try:
                if key_file.exists():
                    c = await Client.connect(self.address, key_file.read_text().strip())
                    if (await c.run("echo", b"ping")).payload == b"ping":
                        return c
                    await c.close()
            except Exception as exc:  # not up yet
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.2)
        raise BenchError(f"casola up not ready: {last}\n{self.procs.log(self.name)}")

    async def serving(self, models: list[str], timeout: float = 120.0) -> None:
        """Until every model in `models` has a registered worker (model workers load before they register)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5.0) as h:
            while time.monotonic() < deadline:
                served = (await h.get(f"http://127.0.0.1:{self.http}/healthz")).json().get("models", {})
                if all(served.get(m, {}).get("workers", 0) for m in models):
                    return
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.2)
        raise BenchError(f"casola up does not serve {models}\n{self.procs.log(self.name)}")

    def key(self) -> str:
        return (self.state / "dev-api-key").read_text().strip()

    async def metrics_text(self) -> str:
        async with httpx.AsyncClient(timeout=5.0) as h:
            return (await h.get(f"http://127.0.0.1:{self.http}/metrics")).text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
