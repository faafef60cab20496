"""Memory a client can make the node hold, measured as the RSS of a real `casola up` process
(DESIGN "Auth and tenancy": nothing is allocated for a peer before it has authenticated beyond a
small fixed bound; "Budgets": memory stays bounded under overload).

The process runs with glibc's default malloc settings (no 128 MiB top pad), so memory it frees goes
back to the system and shows in its RSS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from casola.wire import HEAD, Frame, FrameType, HelloMeta, RequestMeta, encode_frame
from tests.e2e.procs import Keys, Procs, free_port

MIB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident set size of `pid`, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Up:
    def __init__(self, pid: int, http: int, frames: int, queue: int, api_key: str) -> None:
        self.pid, self.http, self.frames, self.queue, self.api_key = pid, http, frames, queue, api_key


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    keys = Keys(tmp_path / "state")
    procs = Procs(keys)
    http, frames, queue = free_port(), free_port(), free_port()
    proc = procs.casola(
        "up", "--http", f"127.0.0.1:{http}", "--frames", f"127.0.0.1:{frames}", "--queue", f"127.0.0.1:{queue}",
        "--log-level", "warning",
    )  # fmt: skip
    try:
        _wait_worker(proc, http, keys.api_key)
        yield Up(proc.pid, http, frames, queue, keys.api_key)
    finally:
        procs.stop_all()


def _wait_worker(proc: subprocess.Popen[bytes], port: int, key: str, timeout: float = 30) -> None:
    """Until `casola up` listens and its echo worker has registered."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"casola up exited with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            time.sleep(0.1)
            continue
        body = data.partition(b"\r\n\r\n")[2]
        if json.loads(body).get("models", {}).get("echo", {}).get("workers"):
            return
        time.sleep(0.1)
    raise TimeoutError("casola up did not come up with an echo worker")


def _settle(pid: int, seconds: float = 0.6) -> int:
    time.sleep(seconds)
    return rss(pid)


def _announce(size: int) -> bytes:
    """A REQUEST header and its metadata announcing `size` payload bytes: 33 bytes, sent before HELLO."""
    meta = msgspec.msgpack.encode(RequestMeta("echo"))
    return HEAD.pack(1, FrameType.REQUEST, 0, 1, len(meta), size) + meta


def test_payloads_announced_before_hello_cost_no_memory(up: Up) -> None:
    """200 connections, half on the raw-frame port and half on the queue node's, each announcing a
    16 MiB payload before HELLO: growth < 20 MiB, and back to the baseline within 2 s of closing."""
    for _ in range(2):  # warm up: the first connections of a process allocate its own structures
        with socket.create_connection(("127.0.0.1", up.frames)) as s:
            s.sendall(_announce(1024))
    base = _settle(up.pid)
    socks = []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", up.frames if i % 2 else up.queue))
        s.sendall(_announce(16 * MIB))
        socks.append(s)
    during = _settle(up.pid, 1.0)
    closed_by_server = 0
    for s in socks:
        s.settimeout(5)
        with contextlib.suppress(OSError):
            while s.recv(65536):
                pass
            closed_by_server += 1
        s.close()
    after = _settle(up.pid, 2.0)
    print(f"RSS baseline {base / MIB:.1f} MiB, with 200 connections +{(during - base) / MIB:.1f} MiB,"
          f" 2 s after closing +{(after - base) / MIB:.1f} MiB")  # fmt: skip
    assert during - base < 20 * MIB
    assert after - base < 4 * MIB
    assert closed_by_server == 200  # each was refused (GOAWAY BAD_STATE), not left waiting


def _frames_hello(key: str) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(Frame(FrameType.HELLO, meta=HelloMeta("client", credential=key))))


def _frames_request(body: bytes, repeat: int) -> bytes:
    meta = RequestMeta("echo", params={"repeat": repeat})
    return b"".join(bytes(b) for b in encode_frame(Frame(FrameType.REQUEST, 1, meta, body, 1)))


@pytest.mark.parametrize("surface", ["http", "frames"])
def test_a_client_that_stops_reading_is_aborted_and_its_buffers_freed(up: Up, surface: str) -> None:
    """It asks for 128 MiB and reads nothing: past 32 MiB unread it is aborted, and what was
    buffered for it is freed at once (a graceful close kept it while the client held the socket)."""
    body = b"x" * MIB
    base = _settle(up.pid)
    s = socket.create_connection(("127.0.0.1", up.http if surface == "http" else up.frames))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a small client: the node buffers the rest
    if surface == "http":
        head = (
            f"POST /v1/run/echo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {up.api_key}\r\n"
            f"X-Casola-Param-Repeat: 128\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        s.sendall(head.encode() + body)
    else:
        s.sendall(_frames_hello(up.api_key))
        time.sleep(0.2)  # HELLO_ACK waits in our receive buffer, unread, like everything after it
        s.sendall(_frames_request(body, 128))
    peak = base
    for _ in range(30):  # the answer flows until the node gives up on the client
        peak = max(peak, _settle(up.pid, 0.1))
    after = _settle(up.pid, 1.0)
    print(f"{surface}: RSS baseline {base / MIB:.1f} MiB, peak +{(peak - base) / MIB:.1f} MiB,"
          f" after the abort +{(after - base) / MIB:.1f} MiB")  # fmt: skip
    try:
        assert after - base < 12 * MIB, "the unread answer is still held"
    finally:
        s.close()
    asyncio.run(asyncio.sleep(0))  # nothing pending in this process
