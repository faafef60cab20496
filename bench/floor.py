"""The raw floor for bench/overhead.py: a length-prefixed uvloop echo through a chain of processes.

Frames are an 8-byte header `!II` (payload length, request id) followed by the payload. Two roles:

- `echo`: accepts connections and returns every payload with its request id.
- `hop --upstream PORT`: accepts any number of connections, forwards every frame over ONE persistent
  connection to 127.0.0.1:PORT under a fresh request id, and routes the answer back to the connection
  and id it came from (the way an ingress or a queue multiplexes).

Both listen on 127.0.0.1, on `--port` (0 = any free port), and print `PORT <n>` on stdout once they
accept connections. `bench/overhead.py` chains them: client -> hop -> hop -> echo.

Receiving uses `asyncio.BufferedProtocol`: small frames are parsed out of one preallocated 256 KiB
buffer; a frame larger than 64 KiB gets its own `bytearray`, and the kernel reads straight into its
unfilled tail (no `bytearray += data; del buf[:n]`). Sending lends the payload to `writelines`.
TCP_NODELAY everywhere. The loop is uvloop.

The bottom of the module is the bench side, imported by bench/overhead.py: `Procs` starts and stops
child processes (and their orphans), `start_floor` starts the chain, and /proc readers give CPU time,
VmRSS and the descendants of a process.

Usage:  python bench/floor.py echo [--port N]
        python bench/floor.py hop --upstream PORT [--port N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import uvloop

HEADER = struct.Struct("!II")
HEAD = HEADER.size
BUF_SIZE = 256 * 1024  # the shared receive buffer for small frames
BIG = 64 * 1024  # a frame with a payload above this gets its own buffer, filled in place
MIN_ROOM = BIG + HEAD + 8 * 1024  # compact the shared buffer when less room than this is left
SMALL_WRITE = 16 * 1024  # below this, header + payload are joined into one write

Payload = bytes | bytearray | memoryview
ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FrameProtocol(asyncio.BufferedProtocol):
    """Length-prefixed frame reader/writer; subclasses implement `on_frame`."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self._buf = bytearray(BUF_SIZE)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._big: bytearray | None = None  # the payload being received in place
        self._big_view = memoryview(b"")
        self._big_got = self._big_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        nodelay(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return self._big_view[self._big_got :]
        if BUF_SIZE - self._end < MIN_ROOM:  # move the partial frame to the front
            n = self._end - self._start
            self._buf[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_got += nbytes
            if self._big_got == len(self._big):
                big, self._big, self._big_view = self._big, None, memoryview(b"")
                self.on_frame(self._big_id, big)
            return
        buf, start, end = self._buf, self._start, self._end + nbytes
        while end - start >= HEAD:
            length, rid = HEADER.unpack_from(buf, start)
            stop = start + HEAD + length
            if stop <= end:
                payload = buf[start + HEAD : stop]  # a copy: the shared buffer is reused
                start = stop
                self.on_frame(rid, payload)
            elif length > BIG:  # its own buffer; what already arrived is copied once
                have = end - start - HEAD
                big = self._big = bytearray(length)
                big[:have] = self._view[start + HEAD : end]
                self._big_view, self._big_got, self._big_id = memoryview(big), have, rid
                start = end = 0
                break
            else:
                break
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def send(self, rid: int, payload: Payload) -> None:
        head = HEADER.pack(len(payload), rid)
        if len(payload) < SMALL_WRITE:
            self.transport.write(head + payload)
        else:
            self.transport.writelines((head, payload))

    def on_frame(self, rid: int, payload: bytearray) -> None:
        raise NotImplementedError


class Echo(FrameProtocol):
    def on_frame(self, rid: int, payload: bytearray) -> None:
        self.send(rid, payload)


class Hop:
    """One upstream connection shared by every downstream connection; request ids are re-tagged."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[Downstream, int]] = {}
        self.next_id = 0
        self.up: Upstream | None = None

    def forward(self, origin: Downstream, rid: int, payload: bytearray) -> None:
        nid = self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        self.pending[nid] = (origin, rid)
        assert self.up is not None
        self.up.send(nid, payload)


class Downstream(FrameProtocol):
    def __init__(self, hop: Hop) -> None:
        super().__init__()
        self.hop = hop

    def on_frame(self, rid: int, payload: bytearray) -> None:
        self.hop.forward(self, rid, payload)


class Upstream(FrameProtocol):
    def __init__(self, hop: Hop, lost: asyncio.Future[None]) -> None:
        super().__init__()
        self.hop, self.lost = hop, lost

    def on_frame(self, rid: int, payload: bytearray) -> None:
        origin, orig_rid = self.hop.pending.pop(rid)
        if not origin.transport.is_closing():
            origin.send(orig_rid, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def serve(role: str, port: int, upstream: int | None) -> None:
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[None] = loop.create_future()  # a hop exits when its upstream goes away
    if role == "echo":
        server = await loop.create_server(Echo, "127.0.0.1", port)
    else:
        assert upstream is not None
        hop = Hop()
        _, hop.up = await loop.create_connection(lambda: Upstream(hop, lost), "127.0.0.1", upstream)
        server = await loop.create_server(lambda: Downstream(hop), "127.0.0.1", port)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await lost


# ------------------------------------------------- the bench side: starting and watching processes


class BenchError(RuntimeError):
    pass


class Procs:
    """Every child this run starts; `stop()` ends them all (terminate, then kill), and their children."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir = env, logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], stdout: int | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # the child keeps its own copy
        p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
        )
        log.close()
        self.procs.append((name, p))
        return p

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self) -> None:
        doomed = {pid: start_time(pid) for _, p in self.procs for pid in descendants(p.pid)}
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # orphans, if the pid still names the same process
            alive = [pid for pid, t0 in doomed.items() if t0 is not None and start_time(pid) == t0]
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if alive and sig == signal.SIGTERM:
                time.sleep(2)
        self.procs.clear()


def read_port(p: subprocess.Popen[bytes], procs: Procs, name: str, timeout: float = 15.0) -> int:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline().decode() if ready else ""
    if not line.startswith("PORT "):
        raise BenchError(f"{name} did not report its port (exit {p.poll()}): {line!r}\n{procs.log(name)}")
    return int(line.split()[1])


def start_floor(procs: Procs) -> tuple[int, list[int]]:
    """P3 echo, P2 hop -> P3, P1 hop -> P2; returns P1's port and the three pids."""
    port, pids = 0, []
    for name, role in (("p3-echo", ["echo"]), ("p2-hop", ["hop"]), ("p1-hop", ["hop"])):
        args = role + (["--upstream", str(port)] if role == ["hop"] else [])
        p = procs.start(name, [sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE)
        port = read_port(p, procs, name)
        pids.append(p.pid)
    return port, pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    f = stat_fields(pid)
    return f[19] if f else None


def cpu_s(pids: list[int]) -> float:
    return sum((int(f[11]) + int(f[12])) / TICK for f in map(stat_fields, pids) if f)


def descendants(pid: int) -> list[int]:
    """Children, grandchildren... of `pid`, from the ppid field of /proc/*/stat."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (f := stat_fields(int(d))):
            kids.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("role", choices=("echo", "hop"))
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    ap.add_argument("--upstream", type=int, help="hop only: the port of the next process")
    args = ap.parse_args(argv)
    if args.role == "hop" and args.upstream is None:
        ap.error("hop needs --upstream")
    try:
        uvloop.run(serve(args.role, args.port, args.upstream))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
