"""No client can hurt another: what one client does to a real `casola up`, and what everyone else sees.

One `casola up` (uvloop, glibc tuned as `casola up` tunes it): an echo worker with 8 slots and a
steps worker with 4. Scenarios, in order, each against the same process:

1. disconnects: 1,000 clients that send a request and go away at once, half over HTTP (request,
   then close), half over raw frames (REQUEST and CANCEL in one write, then close). Afterwards the
   `/healthz` count of free echo slots against the worker's 8.
2. payloads: bodies of 20 MiB and 64 MiB through HTTP and through frames, byte-identical (time per
   round trip); then a frame client advertising max_payload 1,024 sends and receives 1 MiB bodies
   (1,025 frames each way on its hop) while another tenant sends 200 small requests on HTTP and
   frames meanwhile: how many of those succeed.
3. prehello: 200 connections (100 on the raw-frame port, 100 on the queue node's) each sending a
   33-byte REQUEST header announcing a 16 MiB payload before HELLO: the process's RSS before, with
   them open, and 2 s after they closed.
4. flood: three tenants at --rate requests/s each (open loop over HTTP keep-alive, up to 1,500
   connections each) at echo with delay-ms 250 (8 slots: 32 requests/s) for --seconds; a fourth,
   idle tenant sends one request at a time to echo and one at a time to steps. The idle tenant's
   success rate on each, the flooders' statuses, whether every refusal was a 429 with Retry-After,
   and the RSS (sampled every second: first, max, last).
5. revocation: a raw-frame client and a worker process, each with a key of its own; the keys are
   revoked (`KeyStore.revoke`, what `casola keys revoke` does) and the time until the client's
   connection ends and until the worker is no longer registered (/healthz).

Usage:  python bench/isolation.py [--quick] [--seconds T] [--rate R] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
from floor import ROOT, BenchError, Procs, rss_mib
from upstack import Up, pct

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from casola.auth import SCOPE_RUN, SCOPE_WORKER, KeyStore
from casola.client import Client, RequestFailed
from casola.net.errors import ConnectionLost
from casola.wire import FLAG_END, HEAD, CancelMeta, Frame, FrameType, HelloMeta, Limits, RequestMeta, encode_frame

MIB = 1024 * 1024
ECHO_SLOTS, SERVICE_MS = 8, 250


def _raw(frame: Frame) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(frame))


class HttpConn:
    """One keep-alive HTTP/1.1 connection (asyncio streams): status, headers and body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> HttpConn:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 27))

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        head = f"POST {path} HTTP/1.1\r\nHost: b\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode())
        self.writer.write(body)
        status = int((await self.reader.readline()).split()[1])
        fields: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            fields[k.strip().lower()] = v.strip()
        if "content-length" in fields:
            return status, fields, await self.reader.readexactly(int(fields["content-length"]))
        parts = []
        while (size := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass
        return status, fields, b"".join(parts)

    def close(self) -> None:
        self.writer.close()


# -- 1. disconnects -----------------------------------------------------------------------------------


async def disconnects(up: Up, key: str, n: int) -> dict[str, Any]:
    hello = _raw(Frame(FrameType.HELLO, meta=HelloMeta("client", credential=key)))

    async def hit_and_run(i: int) -> None:
        if i % 2:
            _, w = await asyncio.open_connection("127.0.0.1", up.http)
            w.write(f"POST /v1/run/echo HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {key}\r\n"
                    f"X-Casola-Param-Delay-Ms: {i % 3 * 20}\r\nContent-Length: 1\r\n\r\nx".encode())  # fmt: skip
        else:
            r, w = await asyncio.open_connection("127.0.0.1", up.frames)
            w.write(hello)
            await r.readexactly(HEAD.size)
            meta = RequestMeta("echo", params={"delay-ms": i % 3 * 20})
            w.write(
                _raw(Frame(FrameType.REQUEST, 1, meta, b"x", FLAG_END)) + _raw(Frame(FrameType.CANCEL, 1, CancelMeta()))
            )
        w.close()

    for start in range(0, n, 100):
        await asyncio.gather(*(hit_and_run(i) for i in range(start, min(n, start + 100))))
    end = time.monotonic() + 20
    echo: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=5) as h:
        while time.monotonic() < end:
            echo = (await h.get(f"http://127.0.0.1:{up.http}/healthz")).json()["models"]["echo"]
            if echo["free"] == echo["slots"]:
                break
            await asyncio.sleep(0.1)
    return {"clients": n, "free": echo.get("free"), "slots": echo.get("slots"), "ok": echo.get("free") == ECHO_SLOTS}


# -- 2. payloads --------------------------------------------------------------------------------------


async def payloads(up: Up, key: str, other_key: str, sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    http = await HttpConn.open(up.http)
    client = await Client.connect(up.address, key)
    try:
        for size in sizes:
            body = os.urandom(size)
            t0 = time.perf_counter()
            status, _, got = await http.post("/v1/run/echo", body, {"Authorization": f"Bearer {key}"})
            t_http = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = await client.run("echo", body)
            t_frames = time.perf_counter() - t0
            out[f"{size // MIB}MiB"] = {
                "http_identical": status == 200 and got == body, "http_s": round(t_http, 3),
                "frames_identical": res.payload == body, "frames_s": round(t_frames, 3),
            }  # fmt: skip
    finally:
        http.close()
        await client.close()
    out["max_payload_1024"] = await _small_frames_peer(up, key, other_key)
    return out


async def _small_frames_peer(up: Up, key: str, other_key: str) -> dict[str, Any]:
    small = await Client.connect(up.address, key, limits=Limits(max_payload=1024))
    other = await Client.connect(up.address, other_key)
    http = await HttpConn.open(up.http)
    body = os.urandom(MIB)
    try:

        async def small_ones() -> int:
            return sum([(await small.run("echo", body)).payload == body for _ in range(5)])

        async def others() -> int:
            ok = 0
            for i in range(100):
                p = os.urandom(1024 + i)
                ok += (await other.run("echo", p)).payload == p
                status, _, got = await http.post("/v1/run/echo", p, {"Authorization": f"Bearer {other_key}"})
                ok += status == 200 and got == p
            return ok

        small_ok, others_ok = await asyncio.gather(small_ones(), others())
    finally:
        await small.close()
        await other.close()
        http.close()
    return {"small_peer_round_trips": f"{small_ok}/5", "other_tenant_ok": f"{others_ok}/200"}


# -- 3. announced payloads before HELLO ---------------------------------------------------------------


def prehello(up: Up, n: int) -> dict[str, Any]:
    meta = msgspec.msgpack.encode(RequestMeta("echo"))
    announce = HEAD.pack(1, FrameType.REQUEST, 0, 1, len(meta), 16 * MIB) + meta
    time.sleep(1.0)
    base = rss_mib(up.proc.pid)
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", up.frames if i % 2 else up.queue))
        s.sendall(announce)
        socks.append(s)
    time.sleep(1.0)
    during = rss_mib(up.proc.pid)
    refused = 0
    for s in socks:
        s.settimeout(5)
        with contextlib.suppress(OSError):
            data = s.recv(4096)
            refused += len(data) >= HEAD.size and data[1] == FrameType.GOAWAY
        s.close()
    time.sleep(2.0)
    after = rss_mib(up.proc.pid)
    return {
        "connections": n, "refused_with_goaway": refused, "rss_base_mib": round(base, 1),
        "growth_open_mib": round(during - base, 1), "growth_2s_after_mib": round(after - base, 1),
    }  # fmt: skip


# -- 4. flood ------------------------------------------------------------------------------------------


class Flood:
    """One tenant's open loop: a request every 1/rate s over a pool of keep-alive connections that
    grows when every connection is busy (up to `cap`; past it the request is counted as not sent)."""

    def __init__(self, port: int, key: str, rate: float, cap: int = 1500) -> None:
        self.port, self.rate, self.cap = port, rate, cap
        self.headers = {"Authorization": f"Bearer {key}", "X-Casola-Param-Delay-Ms": str(SERVICE_MS)}
        self.free: list[HttpConn] = []
        self.open = 0
        self.statuses: Counter[str] = Counter()
        self.retry_afters: list[int] = []
        self.lat_ok: list[float] = []
        self.lat_refused: list[float] = []
        self.stale = 0  # pooled connections found closed by the server's idle timeout, replaced

    async def run(self, stop: float) -> None:
        tasks, t = [], time.monotonic()
        while t < stop:
            tasks.append(asyncio.ensure_future(self._one()))
            t += 1 / self.rate
            await asyncio.sleep(max(0.0, t - time.monotonic()))
        await asyncio.gather(*tasks)
        for c in self.free:
            c.close()

    async def _one(self) -> None:
        if self.free:
            c = self.free.pop()
        elif self.open < self.cap:
            self.open += 1
            c = await HttpConn.open(self.port)
        else:
            self.statuses["not_sent"] += 1
            return
        t0 = time.perf_counter()
        try:
            status, headers, _ = await c.post("/v1/run/echo", b"flood", self.headers)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            # A keep-alive connection the server closed after its idle timeout (30 s) while it sat
            # in the pool: as HTTP clients do, once more on a new connection.
            self.stale += 1
            c.close()
            c = await HttpConn.open(self.port)
            status, headers, _ = await c.post("/v1/run/echo", b"flood", self.headers)
        dt = time.perf_counter() - t0
        self.statuses[str(status)] += 1
        if status == 429:
            self.lat_refused.append(dt)
            ra = headers.get("retry-after", "")
            self.retry_afters.append(int(ra) if ra.isdigit() else -1)
        elif status == 200:
            self.lat_ok.append(dt)
        self.free.append(c)


async def _idle(port: int, key: str, path: str, headers: dict[str, str], stop: float) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    lat: list[float] = []
    c = await HttpConn.open(port)
    try:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            status, _, _ = await c.post(path, b"idle", {"Authorization": f"Bearer {key}", **headers})
            statuses[str(status)] += 1
            if status == 200:
                lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
    finally:
        c.close()
    total = sum(statuses.values())
    return {
        "requests": total, "statuses": dict(statuses), "success": round(statuses["200"] / total, 4) if total else None,
        "p50_ms": _ms(pct(lat, 50)), "p99_ms": _ms(pct(lat, 99)),
    }  # fmt: skip


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


async def flood(up: Up, keys: list[str], idle_key: str, rate: float, seconds: float) -> dict[str, Any]:
    floods = [Flood(up.http, k, rate) for k in keys]
    rss: list[float] = []
    stop = time.monotonic() + seconds

    async def sample() -> None:
        while time.monotonic() < stop:
            rss.append(rss_mib(up.proc.pid))
            await asyncio.sleep(1.0)

    echo = {"X-Casola-Param-Delay-Ms": str(SERVICE_MS)}
    steps = {"X-Casola-Param-Steps": "1", "X-Casola-Param-Step-Ms": "20"}
    *_, same, other, _ = await asyncio.gather(
        *(f.run(stop) for f in floods),
        _idle(up.http, idle_key, "/v1/run/echo", echo, stop),
        _idle(up.http, idle_key, "/v1/run/steps", steps, stop),
        sample(),
    )
    statuses: Counter[str] = Counter()
    for f in floods:
        statuses.update(f.statuses)
    refusals = [ra for f in floods for ra in f.retry_afters]
    refused_lat = [x for f in floods for x in f.lat_refused]
    stale = sum(f.stale for f in floods)
    ok_lat = [x for f in floods for x in f.lat_ok]
    return {
        "tenants": len(keys), "rate_each": rate, "seconds": seconds, "flood_statuses": dict(statuses),
        "stale_keepalive_reopened": stale,
        "every_refusal_429_with_retry_after": set(statuses) <= {"200", "429"} and all(r >= 1 for r in refusals),
        "retry_after_s": {"min": min(refusals, default=None), "max": max(refusals, default=None)},
        "flood_refused_p50_ms": _ms(pct(refused_lat, 50)), "flood_ok_p99_ms": _ms(pct(ok_lat, 99)),
        "idle_same_model": same, "idle_other_model": other,
        "rss_mib": {"first": rss[0] if rss else None, "max": max(rss, default=None), "last": rss[-1] if rss else None},
    }  # fmt: skip


# -- 5. revocation --------------------------------------------------------------------------------------


async def revocation(up: Up, procs: Procs) -> dict[str, Any]:
    ks = KeyStore(up.state)
    client_claims, client_key = ks.create("revoked-client", [SCOPE_RUN])
    worker_claims, worker_key = ks.create("_workers", [SCOPE_WORKER])
    cred = up.state / "revoked-worker-key"
    cred.write_text(worker_key)
    cmd = [sys.executable, "-m", "casola", "--state-dir", str(up.state), "worker", "--queue", f"127.0.0.1:{up.queue}",
           "--node-id", "revoked-worker", "--credential-file", str(cred), "--log-level", "warning"]  # fmt: skip
    procs.start("revoked-worker", cmd)
    async with httpx.AsyncClient(timeout=5) as h:

        async def workers() -> int:
            return int((await h.get(f"http://127.0.0.1:{up.http}/healthz")).json()["models"]["echo"]["workers"])

        before = await workers()
        end = time.monotonic() + 20
        while (n := await workers()) < before + 1 and time.monotonic() < end:
            await asyncio.sleep(0.1)
        client = await Client.connect(up.address, client_key)
        assert (await client.run("echo", b"x")).payload == b"x"
        t0 = time.monotonic()
        ks.revoke(client_claims.kid)
        await asyncio.wait_for(client._link.closed, 5)
        t_client = time.monotonic() - t0
        try:
            await client.run("echo", b"after")
            refused_after = False
        except (RequestFailed, ConnectionLost):
            refused_after = True
        t0 = time.monotonic()
        ks.revoke(worker_claims.kid)
        while await workers() >= n and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        t_worker = time.monotonic() - t0
    return {"frame_client_closed_ms": round(t_client * 1000), "client_refused_after": refused_after,
            "worker_deregistered_ms": round(t_worker * 1000)}  # fmt: skip


# -- main -----------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    procs = Procs(dict(os.environ), tmp)
    toml = f'[[workers]]\nmodels = ["echo"]\ncapacity = {ECHO_SLOTS}\n[[workers]]\nmodels = ["steps"]\ncapacity = 4\n'
    up = Up(procs, tmp / "up", toml)
    try:
        c = await up.ready()
        await c.close()
        await up.serving(["echo", "steps"])
        key = up.key()
        ks = KeyStore(up.state)
        other = ks.create("other", [SCOPE_RUN])[1]
        flooders = [ks.create(f"flood-{i}", [SCOPE_RUN])[1] for i in range(3)]
        idle = ks.create("idle", [SCOPE_RUN])[1]
        out: dict[str, Any] = {}
        out["disconnects"] = await disconnects(up, key, 200 if args.quick else 1000)
        out["payloads"] = await payloads(up, key, other, [20 * MIB] if args.quick else [20 * MIB, 64 * MIB])
        out["prehello"] = prehello(up, 200)
        out["flood"] = await flood(up, flooders, idle, args.rate, args.seconds)
        out["revocation"] = await revocation(up, procs)
        return out
    finally:
        up.stop()
        procs.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smaller and shorter: a smoke run")
    ap.add_argument("--seconds", type=float, default=None, help="flood duration (default 60; --quick 8)")
    ap.add_argument("--rate", type=float, default=300.0, help="requests/s of each flooding tenant")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.seconds = args.seconds or (8.0 if args.quick else 60.0)
    import uvloop

    with tempfile.TemporaryDirectory() as d:
        try:
            out = uvloop.run(run(args, Path(d)))
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    out["meta"] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
