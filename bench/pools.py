"""Capacity pools benchmark (issue: sync pool vs async backlog): the wait of sync requests with the
sync pool saturated and 10,000 async jobs queued, against a single FIFO queue as baseline, same run.

Target: with 10,000 async jobs queued, sync wait p99 stays within one service time D of the
no-backlog case; a FIFO baseline in the same run shows the gap.

Set-up for phases A and B (one `casola up`): two echo worker processes, capacity 4 each, one in
pool "sync" and one in pool "async". Every request and job carries `delay-ms` = D (default 20 ms:
an async sleep, so the 4 slots of a worker are the limit). The bench talks raw frames to the
ingress (`casola.client.Client`, uvloop), one connection per sync client.

A. NO BACKLOG: a closed loop of C = 6 sync clients (more than the 4 sync slots: the sync pool is
   saturated and 2 overflow onto free async capacity) for T s after a discarded warm-up. Per
   request: `wait` (Server-Timing: the queue node's measured wait for a slot) and end-to-end latency.
B. BACKLOG: N = 10,000 async jobs (1 KiB, delay-ms = D) submitted by 32 concurrent submitters (same
   tenant), then the same sync load for T s while the backlog drains (4 async slots at 20 ms is
   ~200 jobs/s). `casola_pool_queue_depth{model="echo",pool="async"}` from /metrics (refreshed every
   `[queue.jobs] sweep_interval`, 1 s) before the window (read after waiting > sweep_interval), its
   lowest sample during the window, and at its end.
C. FIFO BASELINE: a second `casola up`, both workers pool "shared" (one FIFO queue, all 8 slots).
   N jobs submitted, then the C "sync" clients send their requests as async jobs into that queue
   (submit, then `job_result` long polls of up to 30 s until COMPLETED), R requests each, one after
   the other (default 1: each waits behind the whole backlog; the phase lasts one backlog drain,
   ~30 s for 10,000 jobs here). With R > 1 a top-up task keeps about N jobs queued (it reads the
   depth gauge and submits the difference) so that the later requests arrive behind a backlog too.
   Requests still waiting after --fifo-timeout are reported as unfinished, with a lower bound.
   Everything runs under the one dev key: the job store's claim order is tenant-fair (start-time
   fair queuing), so a second tenant would jump the backlog and this would not be a FIFO.
   Reported: latency, wait = latency - D, and the job's own queue wait from its JobView
   (`started_at - created_at`) and `queue_position` at submit.

Phases run in order A, B, C (a backlog cannot be interleaved with its absence); A and B share a
process, C is another. Checks: B.wait_p99 - A.wait_p99 <= D; FIFO gap = C.wait_p50 / B.wait_p50.

Usage:  python bench/pools.py [--quick] [--delay-ms D] [--clients C] [--seconds T] [--jobs N]
                              [--fifo-requests R] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from floor import ROOT, BenchError, Procs
from upstack import Up, pct

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from casola.client import Client, RequestFailed, Result

KiB = 1024
PAYLOAD = os.urandom(KiB)
SUBMITTERS = 32
PER_CONN = 16  # submitters sharing one connection
SWEEP_S = 1.0  # [queue.jobs] sweep_interval (the default): how fresh the depth gauge is
_METRIC = re.compile(r'^(casola_pool_\w+)\{model="([^"]*)",pool="([^"]*)"\} (\S+)$', re.M)


class PoolsUp(Up):
    """`casola up` with echo workers in the given pools; ready once every worker registered."""

    def __init__(self, procs: Procs, tmp: Path, workers: list[dict[str, Any]]) -> None:
        toml = f'[queue.jobs]\nstore = "sqlite:///{tmp}/jobs.db"\nsweep_interval = {SWEEP_S}\n'
        for w in workers:
            toml += f'[[workers]]\nmodels = ["echo"]\ncount = 1\ncapacity = {w["capacity"]}\npool = "{w["pool"]}"\n'
        super().__init__(procs, tmp, toml)
        self.workers = workers

    async def ready(self, timeout: float = 40.0) -> Client:
        """Until echo answers and every worker has registered in its pool."""
        c = await super().ready(timeout)
        deadline = time.monotonic() + timeout
        want: dict[str, int] = {}
        for w in self.workers:
            want[w["pool"]] = want.get(w["pool"], 0) + 1
        while time.monotonic() < deadline:
            workers = (await self.metrics()).get("casola_pool_workers", {})
            got = {pool: int(workers.get(("echo", pool), 0)) for pool in want}
            if got == want:
                return c
            await asyncio.sleep(0.2)
        await c.close()
        raise BenchError(f"workers per pool {got}, want {want}\n{self.procs.log(self.name)}")

    async def metrics(self) -> dict[str, dict[tuple[str, str], float]]:
        """The casola_pool_* gauges: {name: {(model, pool): value}}."""
        out: dict[str, dict[tuple[str, str], float]] = {}
        for name, model, pool, value in _METRIC.findall(await self.metrics_text()):
            out.setdefault(name, {})[(model, pool)] = float(value)
        return out

    async def depth(self) -> int:
        """Jobs queued for echo, as the store counted them at the last sweep."""
        return int((await self.metrics()).get("casola_pool_queue_depth", {}).get(("echo", "async"), -1))


# ------------------------------------------------------------------------------------- the loads


async def submit_many(address: str, key: str, n: int, delay_ms: int) -> dict[str, Any]:
    """`n` jobs by SUBMITTERS concurrent submitters; durable when acknowledged."""
    clients = [await Client.connect(address, key) for _ in range(max(1, SUBMITTERS // PER_CONN))]
    left = [n]
    errors: list[str] = []
    params = {"delay-ms": delay_ms}

    async def submitter(c: Client) -> None:
        while left[0] > 0:
            left[0] -= 1
            try:
                await c.submit("echo", PAYLOAD, params=params)
            except RequestFailed as exc:
                errors.append(str(exc))
                left[0] += 1
                await asyncio.sleep(max(exc.retry_after_ms, 10) / 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(submitter(clients[i % len(clients)]) for i in range(SUBMITTERS)))
    elapsed = time.perf_counter() - t0
    for c in clients:
        await c.close()
    return {"jobs": n, "seconds": elapsed, "per_s": n / elapsed, "refused": len(errors)}


async def sync_load(up: PoolsUp, clients: int, seconds: float, warm: float, delay_ms: int) -> dict[str, Any]:
    """A closed loop of `clients` sync clients; the depth gauge is sampled every SWEEP_S meanwhile."""
    conns = [await Client.connect(up.address, up.key()) for _ in range(clients)]
    waits: list[float] = []
    lats: list[float] = []
    works: list[float] = []
    errors: dict[str, int] = {}
    state = {"measuring": False, "stop": False}
    params = {"delay-ms": delay_ms}

    async def client(c: Client) -> None:
        while not state["stop"]:
            t0 = time.perf_counter()
            try:
                r = await c.run("echo", PAYLOAD, params=params)
            except RequestFailed as exc:
                errors[exc.message[:80]] = errors.get(exc.message[:80], 0) + 1
                continue
            lat = (time.perf_counter() - t0) * 1000
            if r.payload != PAYLOAD:
                raise BenchError("a request came back with the wrong payload")
            if state["measuring"]:
                lats.append(lat)
                waits.append(r.timing.get("wait", float("nan")))
                works.append(r.timing.get("work", float("nan")))

    samples: list[int] = []

    async def sampler() -> None:
        while True:
            samples.append(await up.depth())
            await asyncio.sleep(SWEEP_S)

    tasks = [asyncio.ensure_future(client(c)) for c in conns]
    await asyncio.sleep(warm)
    state["measuring"] = True
    sampling = asyncio.ensure_future(sampler())
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["measuring"] = False
    elapsed = time.perf_counter() - t0
    sampling.cancel()
    state["stop"] = True
    await asyncio.gather(*tasks)
    for c in conns:
        await c.close()
    busy = (await up.metrics()).get("casola_pool_busy", {})
    return {
        "clients": clients,
        "seconds": elapsed,
        "n": len(lats),
        "per_s": len(lats) / elapsed,
        "wait_p50_ms": pct(waits, 50),
        "wait_p99_ms": pct(waits, 99),
        "wait_max_ms": max(waits) if waits else None,
        "latency_p50_ms": pct(lats, 50),
        "latency_p99_ms": pct(lats, 99),
        "work_p50_ms": pct(works, 50),
        "work_p99_ms": pct(works, 99),
        "errors": errors,
        "depth_samples": samples,
        "busy_at_end": {pool: busy.get(("echo", pool)) for pool in ("sync", "shared", "async")},
    }


async def fifo_load(
    up: PoolsUp, clients: int, per_client: int, target: int, delay_ms: int, timeout: float
) -> dict[str, Any]:
    """C "sync" clients sending their requests as async jobs (submit + long poll) into the FIFO
    queue, `per_client` each, one after the other. Each client's first request arrives right behind
    the backlog; for the later ones (per_client > 1) a top-up task keeps about `target` jobs queued.
    Requests still waiting after `timeout` s are counted (`unfinished`), and their wait so far given
    as a lower bound."""
    key = up.key()
    conns = [await Client.connect(up.address, key) for _ in range(clients)]
    lats: list[float] = []
    qwaits: list[float] = []
    positions: list[int] = []
    samples: list[int] = []
    started: dict[int, float] = {}  # client -> when its request in flight was submitted
    topped = [0]
    params = {"delay-ms": delay_ms}
    done = asyncio.Event()

    async def topup() -> None:
        while not done.is_set():
            d = await up.depth()
            samples.append(d)
            if 0 <= d < target:
                await submit_many(up.address, key, target - d, delay_ms)
                topped[0] += target - d
                await asyncio.sleep(SWEEP_S * 1.2)  # the next reading counts what was just added
            await asyncio.sleep(SWEEP_S)

    async def client(i: int, c: Client) -> None:
        for _ in range(per_client):
            t0 = started[i] = time.perf_counter()
            view = await c.submit("echo", PAYLOAD, params=params)
            positions.append(-1 if view.queue_position is None else view.queue_position)
            while True:
                res = await c.job_result(view.request_id, wait_ms=30_000)
                if isinstance(res, Result):
                    break
                if res.status == "COMPLETED":
                    raise BenchError(f"job {view.request_id} failed: {res.error_type}: {res.error}")
            lats.append((time.perf_counter() - t0) * 1000)
            del started[i]
            if res.payload != PAYLOAD:
                raise BenchError("a job came back with the wrong payload")
            jv = await c.job(view.request_id)
            if jv.started_at is not None and jv.created_at:
                qwaits.append((jv.started_at - jv.created_at) * 1000)

    filler = asyncio.ensure_future(topup()) if per_client > 1 else None
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(client(i, c)) for i, c in enumerate(conns)]
    _, late = await asyncio.wait(tasks, timeout=timeout)
    now = time.perf_counter()
    unfinished = [(now - t) * 1000 - delay_ms for t in started.values()]
    for t in late:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    done.set()
    if filler is not None:
        await filler
    elapsed = time.perf_counter() - t0
    for c in conns:
        await c.close()
    waits = [x - delay_ms for x in lats]
    return {
        "clients": clients,
        "per_client": per_client,
        "seconds": elapsed,
        "n": len(lats),
        "unfinished": len(unfinished),
        "unfinished_wait_at_least_ms": min(unfinished) if unfinished else None,
        "wait_p50_ms": pct(waits, 50),
        "wait_p99_ms": pct(waits, 99),
        "latency_p50_ms": pct(lats, 50),
        "latency_p99_ms": pct(lats, 99),
        "job_queue_wait_p50_ms": pct(qwaits, 50),
        "job_queue_wait_p99_ms": pct(qwaits, 99),
        "queue_position_at_submit_p50": pct([float(p) for p in positions if p >= 0], 50),
        "topped_up": topped[0],
        "depth_samples": samples,
    }


# ------------------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    D, C = args.delay_ms, args.clients
    out: dict[str, Any] = {"delay_ms": D, "clients": C, "jobs": args.jobs, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="casola-bench-pools-") as d:
        tmp = Path(d)
        procs = Procs(dict(os.environ), tmp)
        try:
            up = PoolsUp(procs, tmp / "pools", [{"pool": "sync", "capacity": 4}, {"pool": "async", "capacity": 4}])
            await (await up.ready()).close()
            print(f"A: no backlog, {C} sync clients, {args.seconds:g} s", file=sys.stderr, flush=True)
            a = await sync_load(up, C, args.seconds, args.warm, D)
            a["depth_before"] = a["depth_after"] = await up.depth()
            out["A"] = a
            print(f"B: submitting {args.jobs} jobs", file=sys.stderr, flush=True)
            out["B_submit"] = await submit_many(up.address, up.key(), args.jobs, D)
            await asyncio.sleep(SWEEP_S * 1.2)  # a sweep after the last submit: the gauge is fresh
            before = await up.depth()
            print(f"B: {before} queued; {C} sync clients, {args.seconds:g} s", file=sys.stderr, flush=True)
            b = await sync_load(up, C, args.seconds, args.warm, D)
            b["depth_before"] = before
            b["depth_after"] = await up.depth()  # the last sweep's count: at most SWEEP_S old
            b["depth_min_in_window"] = min(b["depth_samples"]) if b["depth_samples"] else None
            out["B"] = b
            up.stop()

            fifo = PoolsUp(procs, tmp / "fifo", [{"pool": "shared", "capacity": 4}, {"pool": "shared", "capacity": 4}])
            await (await fifo.ready()).close()
            print(f"C: submitting {args.jobs} jobs (FIFO, 8 shared slots)", file=sys.stderr, flush=True)
            out["C_submit"] = await submit_many(fifo.address, fifo.key(), args.jobs, D)
            await asyncio.sleep(SWEEP_S * 1.2)
            before = await fifo.depth()
            print(
                f"C: {before} queued; {C} clients x {args.fifo_requests} jobs"
                + (f", kept topped up to {args.jobs}" if args.fifo_requests > 1 else ""),
                file=sys.stderr,
                flush=True,
            )
            c = await fifo_load(fifo, C, args.fifo_requests, args.jobs, D, args.fifo_timeout)
            c["depth_before"] = before
            c["depth_after"] = await fifo.depth()
            out["C"] = c
            fifo.stop()
        finally:
            procs.stop()
    report(out)
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "results": out,
    }


def _f(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(r: dict[str, Any]) -> None:
    D = r["delay_ms"]
    print(f"\nsync wait with the sync pool saturated, echo 1 KiB, D = {D} ms, {r['clients']} sync clients (ms)")
    for ph in ("B_submit", "C_submit"):
        s = r[ph]
        print(
            f"  {ph[0]}: {s['jobs']} jobs submitted in {s['seconds']:.1f} s"
            f" ({s['per_s']:,.0f}/s, {s['refused']} refused)"
        )
    print(
        f"{'phase':<22} {'n':>6} {'wait p50':>9} {'wait p99':>9} {'lat p50':>9} {'lat p99':>9}"
        f" {'queued before':>14} {'after':>7}"
    )
    labels = {"A": "A no backlog", "B": "B backlog, pools", "C": "C backlog, FIFO"}
    for ph in ("A", "B", "C"):
        x = r[ph]
        print(
            f"{labels[ph]:<22} {x['n']:>6} {_f(x['wait_p50_ms']):>9} {_f(x['wait_p99_ms']):>9}"
            f" {_f(x['latency_p50_ms']):>9} {_f(x['latency_p99_ms']):>9}"
            f" {x['depth_before']:>14} {x['depth_after']:>7}"
        )
    a, b, c = r["A"], r["B"], r["C"]
    for ph, x in (("A", a), ("B", b)):
        if x["errors"]:
            print(f"  {ph} errors: {x['errors']}")
    print(
        f"  worker-reported work (the {D} ms sleep as it ran): A p50 {_f(a['work_p50_ms'])} p99 {_f(a['work_p99_ms'])};"
        f" B p50 {_f(b['work_p50_ms'])} p99 {_f(b['work_p99_ms'])}"
    )
    print(
        f"  B: depth in window min {b['depth_min_in_window']} (samples {b['depth_samples']});"
        f" busy at end {b['busy_at_end']}; {b['per_s']:.0f} sync req/s (A: {a['per_s']:.0f})"
    )
    if c["unfinished"]:
        print(
            f"  C: {c['unfinished']} requests still waiting when the phase was stopped after {c['seconds']:.0f} s"
            f" (waited at least {c['unfinished_wait_at_least_ms']:.0f} ms; not in the percentiles)"
        )
    print(
        f"  C: {c['n']} requests ({c['clients']} x {c['per_client']}) in {c['seconds']:.1f} s; job queue wait"
        f" (started_at - created_at) p50 {_f(c['job_queue_wait_p50_ms'], '.0f')}"
        f" p99 {_f(c['job_queue_wait_p99_ms'], '.0f')};"
        f" queue_position at submit p50 {_f(c['queue_position_at_submit_p50'], '.0f')}; topped up {c['topped_up']} jobs"
    )
    gap = b["wait_p99_ms"] - a["wait_p99_ms"]
    ok = gap <= D
    r["check_wait_p99_gap_ms"] = gap
    r["check_ok"] = ok
    print(
        f"check: B.wait_p99 - A.wait_p99 = {b['wait_p99_ms']:.2f} - {a['wait_p99_ms']:.2f} = {gap:.2f} ms"
        f" <= D = {D} ms: {'PASS' if ok else 'FAIL'}"
    )
    if c["wait_p50_ms"] is None:
        print("FIFO gap: no FIFO request completed (see above)")
        return
    r["fifo_gap_ms"] = c["wait_p50_ms"] - b["wait_p50_ms"]
    if b["wait_p50_ms"] > 0:
        r["fifo_gap"] = c["wait_p50_ms"] / b["wait_p50_ms"]
        ratio = f"{r['fifo_gap']:,.0f}x"
    else:
        ratio = "unbounded (B waited 0 at the median: dispatched at once)"
    print(
        f"FIFO gap: C.wait_p50 / B.wait_p50 = {c['wait_p50_ms']:.1f} / {b['wait_p50_ms']:.4f} ms = {ratio};"
        f" C.wait_p50 / B.wait_p99 = {c['wait_p50_ms'] / max(b['wait_p99_ms'], 1e-9):,.0f}x"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 jobs, 4 s windows, FIFO timeout 30 s")
    ap.add_argument("--delay-ms", type=int, default=20, help="service time D of every request and job")
    ap.add_argument("--clients", type=int, default=6, help="concurrent sync clients")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured window of phases A and B")
    ap.add_argument("--warm", type=float, default=1.0, help="discarded warm-up before each window")
    ap.add_argument("--jobs", type=int, default=10_000, help="backlog of async jobs (B, C)")
    ap.add_argument(
        "--fifo-requests",
        type=int,
        default=1,
        help="requests per client in the FIFO phase (> 1: the backlog is topped up)",
    )
    ap.add_argument("--fifo-timeout", type=float, default=120.0, help="stop waiting in the FIFO phase after this long")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.jobs, args.seconds, args.warm, args.fifo_timeout = 2000, 4.0, 0.5, 30.0
    import uvloop

    out = uvloop.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
