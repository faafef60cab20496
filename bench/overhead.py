"""End-to-end overhead benchmark (issue 3): `casola up` against a raw 3-process floor, same run.

1. FLOOR: client -> P1 -> P2 -> P3 -> back, bench/floor.py processes: a length-prefixed (`!II`)
   uvloop echo; P1 and P2 each forward over ONE persistent multiplexed TCP connection, re-tagging
   request ids (what an ingress and a queue node cannot do with less).
2. CASOLA: `python -m casola up` with one echo worker (capacity 64, max_pending 256); closed-loop
   `POST /v1/run/echo` with `X-Casola-Trace: 1`. Per request: total - `work` from Server-Timing is
   the platform overhead; every Server-Timing entry (queue-overhead, ...) is summarised too.
3. Cells 1 KiB / 1 MiB x c = 1 / 32 closed-loop clients (one request in flight each, keep-alive).
   Floor and casola alternate within each repetition (order flipped every repetition); the ratio
   casola/floor p50 is taken per repetition, then the median over repetitions.
4. OVERLOAD: 512 closed-loop clients against the echo with `delay-ms: 20` for `--overload` seconds;
   counts 200/429/other, checks Retry-After on every 429, samples VmRSS of `casola up` and of its
   descendants once a second.

All processes (the floor's and casola's) run with the same environment, MALLOC_TOP_PAD_ included
(PERF-ANCHORS finding 1); the bench process re-executes itself once to get it too.

Usage:  python bench/overhead.py [--quick] [--floor-only] [--overload S] [--reps N] [--json PATH]
        python bench/overhead.py --self-test     # the HTTP client against an in-process dummy server
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loadgen
import numpy as np
import uvloop
from floor import ROOT, BenchError, Procs, cpu_s, descendants, free_port, rss_mib, start_floor
from loadgen import Connect, DummyHttp, drive, frame_connector, http_connector, http_request, summarize

if str(ROOT) not in sys.path:  # find_spec("casola.__main__") looks from the repository root
    sys.path.insert(0, str(ROOT))
KiB, MiB = 1024, 1024 * 1024
CELLS = ((KiB, 1), (KiB, 32), (MiB, 1), (MiB, 32))
MALLOC_TOP_PAD = 134217728
OVERLOAD_CLIENTS, OVERLOAD_DELAY_MS, MAX_PENDING, CAPACITY = 512, 20, 256, 64


def label(size: int, c: int) -> str:
    return f"{size // MiB} MiB c={c}" if size >= MiB else f"{size // KiB} KiB c={c}"


# ---------------------------------------------------------------- casola up


class Casola:
    """A started `casola up`: readiness via /healthz, the dev API key from the state dir."""

    def __init__(self, procs: Procs, http: int, state: Path, proc: subprocess.Popen[bytes]) -> None:
        self.procs, self.http, self.state, self.proc, self.pid = procs, http, state, proc, proc.pid
        self.key = ""

    @classmethod
    def start(cls, procs: Procs, tmp: Path, up_cmd: list[str]) -> Casola:
        """Write the bench's config (one echo worker) and start `python <up_cmd> --config --state-dir`."""
        if up_cmd == ["-m", "casola", "up"] and importlib.util.find_spec("casola.__main__") is None:
            raise BenchError("`python -m casola up` does not exist yet (no casola/__main__.py); use --floor-only")
        http, frames, queue = free_port(), free_port(), free_port()
        state, config = tmp / "state", tmp / "casola.toml"
        state.mkdir()
        config.write_text(
            f'[ingress]\nhttp = "127.0.0.1:{http}"\nframes = "127.0.0.1:{frames}"\ntrace = true\n'
            f'[queue]\nlisten = "127.0.0.1:{queue}"\nmax_pending = {MAX_PENDING}\n'
            f'[[workers]]\nmodels = ["echo"]\ncount = 1\ncapacity = {CAPACITY}\n'
        )
        cmd = [sys.executable, *up_cmd, "--config", str(config), "--state-dir", str(state)]
        return cls(procs, http, state, procs.start("casola-up", cmd))

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        import http.client

        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"casola up exited with {self.proc.returncode} before it was ready:\n{self.procs.log('casola-up')}"
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.http, timeout=1.0)
                conn.request("GET", "/healthz")
                r = conn.getresponse()
                body = r.read()
                conn.close()
                last = f"{r.status} {body[:300]!r}"
                if r.status == 200 and json.loads(body)["models"]["echo"]["workers"] >= 1:
                    key_file = self.state / "dev-api-key"
                    self.key = key_file.read_text().strip() if key_file.exists() else ""
                    if not self.key:
                        raise BenchError(f"casola up is ready but {key_file} is missing or empty")
                    return dict(json.loads(body))
            except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
        raise BenchError(
            f"casola up not ready after {timeout:.0f} s (last /healthz: {last}):\n{self.procs.log('casola-up')}"
        )

    def request(self, payload: bytes, **params: str) -> tuple[bytes, bytes]:
        headers = {
            "Authorization": f"Bearer {self.key}",
            "Content-Type": "application/octet-stream",
            "X-Casola-Trace": "1",
        }
        headers.update({f"X-Casola-Param-{k.replace('_', '-').title()}": v for k, v in params.items()})
        return http_request("127.0.0.1", self.http, "/v1/run/echo", payload, headers)

    def pids(self) -> list[int]:
        return [self.pid, *descendants(self.pid)]


def check_contract(port: int, request: tuple[bytes, bytes]) -> dict[str, float]:
    """One request before anything is timed: 200, the same body, a parseable Server-Timing."""
    import http.client

    head, body = request
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers.pop("Host", None)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", lines[0].split()[1], body=body, headers=headers)
    r = conn.getresponse()
    got = r.read()
    conn.close()
    if r.status != 200 or got != body:
        raise BenchError(
            f"POST /v1/run/echo: {r.status}, body {len(got)} bytes (sent {len(body)}), "
            f"equal={got == body}: {got[:200]!r}"
        )
    st = loadgen.parse_server_timing((r.getheader("Server-Timing") or "").encode("latin-1"))
    if not st:
        raise BenchError(f"POST /v1/run/echo: no parseable Server-Timing header: {r.getheaders()}")
    if "work" not in st:
        print(f"  note: Server-Timing has no 'work' entry ({st}); overhead = total - work is not reported")
    return st


# ---------------------------------------------------------------- measuring


def cpu_hook(pids: list[int], into: dict[str, float]) -> Callable[[str], None]:
    def hook(phase: str) -> None:
        if phase in ("begin", "end"):
            into[phase] = cpu_s(pids)

    return hook


async def measure_cell(connect: Connect, c: int, warm: float, meas: float, pids: list[int]) -> dict[str, Any]:
    cpu: dict[str, float] = {}
    run = await drive(connect, c, warm, meas, cpu_hook(pids, cpu))
    s = summarize(run)
    s["server_cpu_ms_per_req"] = (cpu["end"] - cpu["begin"]) * 1e3 / s["n"] if s["n"] else None
    if set(s["statuses"]) - {200} or s["errors"]:
        print(f"    ! statuses {s['statuses']} errors {s['errors']}")
    return s


async def overload(cas: Casola, payload: bytes, warm: float, seconds: float) -> dict[str, Any]:
    req = cas.request(payload, delay_ms=str(OVERLOAD_DELAY_MS))
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()

    def hook(phase: str) -> None:
        kids = descendants(cas.pid)
        up = rss_mib(cas.pid)
        samples.append(
            {
                "t_s": round(time.monotonic() - t0, 2),
                "up_mib": up,
                "total_mib": up + sum(rss_mib(k) for k in kids),
                "children": len(kids),
            }
        )

    run = await drive(http_connector("127.0.0.1", cas.http, req, verify=2), OVERLOAD_CLIENTS, warm, seconds, hook)
    s = summarize(run)
    out: dict[str, Any] = {"clients": OVERLOAD_CLIENTS, "delay_ms": OVERLOAD_DELAY_MS, "warmup_s": warm, **s}
    out["n200"], out["n429"] = s["statuses"].get(200, 0), s["statuses"].get(429, 0)
    out["other"] = {k: v for k, v in s["statuses"].items() if k not in (200, 429)}
    out["every_429_had_retry_after"] = run.no_retry_after == 0
    for key in ("up_mib", "total_mib"):
        xs = [x[key] for x in samples]
        out[key] = {"start": xs[0], "max": max(xs), "end": xs[-1], "growth": max(xs) - xs[0]}
    out["rss_samples"] = samples
    out["growth_under_50_mib"] = out["total_mib"]["growth"] < 50
    return out


def med(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def report(cells: dict[str, dict[str, Any]], stacks: list[str]) -> None:
    print("\nPer cell: median over repetitions (us; req/s counts 200s; CPU ms per request: server processes, client)")
    print(
        f"{'cell':<13}{'stack':<8}{'p50 us':>10}{'p99 us':>10}{'req/s':>9}{'cpu ms':>8}{'client ms':>10}"
        f"{'overhead p50':>14}{'x floor p50':>13}"
    )
    for name, cell in cells.items():
        for stack in stacks:
            reps = cell[stack]["reps"]
            m = cell[stack]["median"] = {
                k: med([r.get(k) for r in reps])
                for k in (
                    "p50_us",
                    "p99_us",
                    "req_s",
                    "server_cpu_ms_per_req",
                    "overhead_p50_us",
                    "client_cpu_ms_per_req",
                )
            }
            ratio = cell.get("ratio_p50", {}).get("median") if stack == "casola" else None
            print(
                f"{name if stack == stacks[0] else '':<13}{stack:<8}{fmt(m['p50_us'], ',.1f'):>10}"
                f"{fmt(m['p99_us'], ',.1f'):>10}{fmt(m['req_s']):>9}{fmt(m['server_cpu_ms_per_req'], '.3f'):>8}"
                f"{fmt(m['client_cpu_ms_per_req'], '.3f'):>10}{fmt(m['overhead_p50_us'], ',.1f'):>14}"
                f"{fmt(ratio, '.2f'):>13}"
            )
    if "casola" not in stacks:
        return
    names = sorted({k for c in cells.values() for r in c["casola"]["reps"] for k in r.get("server_timing_p50_us", {})})
    print("\nCasola Server-Timing entries: p50 in us, median over repetitions")
    print(f"{'cell':<13}" + "".join(f"{n:>16}" for n in names))
    for name, cell in cells.items():
        st = {n: med([r.get("server_timing_p50_us", {}).get(n) for r in cell["casola"]["reps"]]) for n in names}
        cell["casola"]["median"]["server_timing_p50_us"] = st
        print(f"{name:<13}" + "".join(f"{fmt(st[n], ',.1f'):>16}" for n in names))


def report_overload(o: dict[str, Any]) -> None:
    print(
        f"\nOverload: {o['clients']} clients, delay-ms {o['delay_ms']}, {o['window_s']:.1f} s measured after"
        f" {o['warmup_s']:g} s warm-up"
    )
    print(
        f"  200: {o['n200']:,} ({o['req_s']:,.0f}/s, p50 {fmt(o['p50_us'])} us, p99 {fmt(o['p99_us'])} us)"
        f"   429: {o['n429']:,} (p50 {fmt(o.get('other_p50_us'))} us)   other: {o['other'] or 'none'}"
    )
    print(
        f"  every 429 had Retry-After: {o['every_429_had_retry_after']} ({o['no_retry_after']} without);"
        f" errors: {o['errors'] or 'none'}; reconnects: {o['reconnects']}"
    )
    for key, what in (("up_mib", "casola up"), ("total_mib", "up + workers")):
        r = o[key]
        print(
            f"  RSS {what:<13} start {r['start']:7.1f}  max {r['max']:7.1f}  end {r['end']:7.1f}  "
            f"growth {r['growth']:+6.1f} MiB"
        )
    print(f"  target growth < 50 MiB: {'yes' if o['growth_under_50_mib'] else 'NO'}")


async def bench(args: argparse.Namespace, floor_port: int, floor_pids: list[int], cas: Casola | None) -> dict[str, Any]:
    warm, meas = (0.3, 1.5) if args.quick else (1.0, 5.0)
    stacks = ["floor"] + (["casola"] if cas else [])
    payloads = {size: np.random.default_rng(size).bytes(size) for size, _ in CELLS}
    cells: dict[str, dict[str, Any]] = {label(s, c): {k: {"reps": []} for k in stacks} for s, c in CELLS}
    for rep in range(args.reps):
        print(f"repetition {rep + 1}/{args.reps} ({warm} s warm-up, {meas} s measured per cell)")
        for size, c in CELLS:
            name, payload = label(size, c), payloads[size]
            for stack in stacks if rep % 2 == 0 else stacks[::-1]:
                if stack == "floor":
                    conn, pids = frame_connector("127.0.0.1", floor_port, payload), floor_pids
                else:
                    assert cas is not None
                    conn, pids = http_connector("127.0.0.1", cas.http, cas.request(payload)), cas.pids()
                s = await measure_cell(conn, c, warm, meas, pids)
                cells[name][stack]["reps"].append(s)
                print(
                    f"  {name:<12} {stack:<7} p50 {fmt(s['p50_us'], ',.1f'):>9} us  p99 "
                    f"{fmt(s['p99_us'], ',.1f'):>9} us  {s['req_s']:>9,.0f} req/s"
                )
            if cas:
                fl, ca = cells[name]["floor"]["reps"][-1], cells[name]["casola"]["reps"][-1]
                cells[name].setdefault("ratio_p50", {"reps": []})["reps"].append(
                    ca["p50_us"] / fl["p50_us"] if ca["p50_us"] and fl["p50_us"] else None
                )
    for cell in cells.values():
        if "ratio_p50" in cell:
            cell["ratio_p50"]["median"] = med(cell["ratio_p50"]["reps"])
    report(cells, stacks)
    out: dict[str, Any] = {"cells": cells}
    if cas and args.overload > 0:
        o = out["overload"] = await overload(cas, payloads[KiB], 1.0 if args.quick else 5.0, args.overload)
        report_overload(o)
    return out


# ---------------------------------------------------------------- self-test


async def self_test_runs(cas: Casola) -> list[dict[str, Any]]:
    out = []
    for size, c in ((KiB, 1), (KiB, 8), (MiB, 2)):
        req = cas.request(os.urandom(size))
        out.append(summarize(await drive(http_connector("127.0.0.1", cas.http, req), c, 0.2, 0.5)))
    head, body = cas.request(b"z" * KiB)
    bad = (head.replace(b"\r\n\r\n", b"\r\nX-Test-Corrupt: 1\r\n\r\n"), body)
    out.append(summarize(await drive(http_connector("127.0.0.1", cas.http, bad, verify=3), 1, 0.2, 0.2)))
    DummyHttp.bound = 16
    out.append(await overload(cas, b"y" * KiB, 0.3, 2.0))
    return out


def self_test() -> int:
    """The HTTP load generator, Server-Timing parsing, the readiness poll, the contract check and the
    overload path, against DummyHttp in a thread of this process (no casola; RSS is this process's)."""
    ready, box = threading.Event(), {}

    def serve() -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            srv = await loop.create_server(DummyHttp, "127.0.0.1", 0)
            box.update(port=srv.sockets[0].getsockname()[1], loop=loop, stop=loop.create_future())
            ready.set()
            async with srv:
                await box["stop"]

        uvloop.run(main())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(5)
    with tempfile.TemporaryDirectory(prefix="casola-selftest-") as tmp:
        procs = Procs(dict(os.environ), Path(tmp))
        cas = Casola(procs, box["port"], Path(tmp), procs.start("sleeper", ["sleep", "60"]))
        cas.pid = os.getpid()
        (cas.state / "dev-api-key").write_text("k\n")
        try:
            assert cas.wait_ready(5)["models"]["echo"]["workers"] == 1 and cas.key == "k"
            st = check_contract(cas.http, cas.request(b"x" * 100))
            assert st == {"ingress": 0.12, "queue-overhead": 0.045, "wait": 0.0, "work": 0.0}, st
            *cells, corrupt, o = uvloop.run(self_test_runs(cas))
            for s in cells:
                print(
                    f"  cell: {s['ok']} x 200, p50 {s['p50_us']:.0f} us, {s['req_s']:,.0f} req/s, verified "
                    f"{s['verified']}, overhead p50 {s['overhead_p50_us']:.0f} us, st {s['server_timing_p50_us']}"
                )
                assert s["ok"] > 10 and s["statuses"] == {200: s["ok"]} and not s["errors"] and s["verified"] > 0, s
                assert s["server_timing_p50_us"]["queue-overhead"] == 45.0 and s["overhead_p50_us"] > 0, s
            print(f"  corrupted bodies: {corrupt['errors']}")
            assert corrupt["errors"] == {"200 with a body that differs from the request": 3}, corrupt
            report_overload(o)
            assert o["n200"] > 0 and o["n429"] > 0 and o["every_429_had_retry_after"] and o["reconnects"] > 0, o
            assert not o["other"] and not o["errors"] and o["p50_us"] >= 20_000, o
            print("self-test passed")
            return 0
        finally:
            box["loop"].call_soon_threadsafe(box["stop"].set_result, None)
            th.join(5)
            procs.stop()


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="1 repetition, 0.3 s warm-up, 1.5 s measured per cell")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--floor-only", action="store_true", help="measure the floor only (no casola up)")
    ap.add_argument("--overload", type=float, metavar="S", help="overload seconds (60; 5 with --quick; 0 skips)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON here")
    ap.add_argument(
        "--malloc-top-pad",
        type=int,
        default=MALLOC_TOP_PAD,
        metavar="BYTES",
        help="MALLOC_TOP_PAD_ for every process (default 128 MiB; -1 leaves glibc's default)",
    )
    ap.add_argument("--up-cmd", default="-m casola up", help="python arguments that start casola up")
    ap.add_argument("--self-test", action="store_true", help="test the HTTP client against a dummy server")
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.overload = (5.0 if args.quick else 60.0) if args.overload is None else args.overload
    env = dict(os.environ)
    env.pop("MALLOC_TOP_PAD_", None)
    if args.malloc_top_pad >= 0:
        env["MALLOC_TOP_PAD_"] = str(args.malloc_top_pad)
    if os.environ.get("MALLOC_TOP_PAD_") != env.get("MALLOC_TOP_PAD_"):  # the bench process gets it too
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.self_test:
        return self_test()
    meta = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "uvloop": uvloop.__version__,
        "reps": args.reps,
        "quick": args.quick,
        "malloc_top_pad": env.get("MALLOC_TOP_PAD_"),
        "loadavg_start": os.getloadavg(),
        "command": " ".join(["bench/overhead.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(
        f"casola end-to-end overhead: CPython {meta['python']}, {meta['platform']}, {meta['cpus']} CPUs, "
        f"{meta['date']}, MALLOC_TOP_PAD_={meta['malloc_top_pad']}"
    )
    if meta["loadavg_start"][0] > 0.5:
        print(f"  warning: load average {meta['loadavg_start'][0]:.2f} before the run; other processes share the CPUs")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="casola-bench-") as tmp:
        procs = Procs(env, Path(tmp))
        try:
            floor_port, floor_pids = start_floor(procs)
            cas = None
            if not args.floor_only:
                cas = Casola.start(procs, Path(tmp), args.up_cmd.split())
                meta["healthz"] = cas.wait_ready()
                meta["server_timing_first"] = check_contract(cas.http, cas.request(b"c" * KiB))
            res = {"env": meta, **uvloop.run(bench(args, floor_port, floor_pids, cas))}
        except BenchError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted; stopping every process started", file=sys.stderr)
            return 130
        except OSError as e:  # a server went away in the middle of the run
            print(f"\nerror: {type(e).__name__}: {e}\ncasola up log:\n{procs.log('casola-up')}", file=sys.stderr)
            return 2
        finally:
            procs.stop()
    meta["elapsed_s"], meta["loadavg_end"] = round(time.perf_counter() - t0, 1), os.getloadavg()
    la = meta["loadavg_start"][0], meta["loadavg_end"][0]
    print(f"\n({meta['elapsed_s']} s; load average {la[0]:.2f} before, {la[1]:.2f} after)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
