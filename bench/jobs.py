"""Async job benchmark (issue 4): submit->result overhead against sync for the same echo work, and the
sustained async submit rate, on SQLite and on PostgreSQL, same run.

Per backend: `python -m casola up` (ingress + queue node in one process, one echo worker process,
capacity 64) with `[queue.jobs] store` set to that backend. The bench process talks raw frames to
the ingress (`casola.client.Client`, uvloop), so sync and async cross the same hops:

1. LATENCY, c=1, 1 KiB, interleaved pairs: sync `run("echo")` vs async `submit("echo")` then
   `job_result(wait_ms=…)` (a long poll that returns when the queue node records the result).
   Reported: p50/p99 of each, and the median of the per-pair difference (async - sync) = the
   async contract's overhead: the durable submit, the lease, the durable result, one more round trip.
2. SUSTAINED SUBMITS, c=64 submitters for `--duration` s: each submits 1 KiB jobs back to back
   (durable when acknowledged). Reported: acknowledged submits/s, submit latency p50/p99, and the
   jobs completed per second over the same window (the workers keep up, or the backlog grows).

Targets (issue 4): async overhead p50 <= 2 ms at c=1 on SQLite; >= 1,000 submits/s on both.

Usage:  python bench/jobs.py [--quick] [--pairs N] [--duration S] [--json PATH] [--pg-dsn URL | --no-pg]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from floor import ROOT, BenchError, Procs
from store import drop_schema
from upstack import Up, pct

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from casola.client import Client, Result

KiB = 1024
PAYLOAD = os.urandom(KiB)
PG_DSN = "postgresql://127.0.0.1:5432/test"


async def latency(c: Client, pairs: int) -> dict[str, Any]:
    sync_ms: list[float] = []
    async_ms: list[float] = []
    diffs: list[float] = []
    for i in range(pairs):
        order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate which goes first
        got = [0.0, 0.0]
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                r = await c.run("echo", PAYLOAD)
                ok = r.payload == PAYLOAD
            else:
                view = await c.submit("echo", PAYLOAD)
                res = await c.job_result(view.request_id, wait_ms=10_000)
                ok = isinstance(res, Result) and res.payload == PAYLOAD
            got[which] = (time.perf_counter() - t0) * 1000
            if not ok:
                raise BenchError("a request came back with the wrong payload")
        sync_ms.append(got[0])
        async_ms.append(got[1])
        diffs.append(got[1] - got[0])
    return {
        "pairs": pairs,
        "sync_p50_ms": pct(sync_ms, 50),
        "sync_p99_ms": pct(sync_ms, 99),
        "async_p50_ms": pct(async_ms, 50),
        "async_p99_ms": pct(async_ms, 99),
        "overhead_p50_ms": statistics.median(diffs),
        "overhead_p99_ms": pct(diffs, 99),
    }


async def sustained(address: str, key: str, concurrency: int, duration: float, warm: float) -> dict[str, Any]:
    clients = [await Client.connect(address, key) for _ in range(max(1, concurrency // 16))]
    lat: list[float] = []
    ids: list[str] = []
    state = {"measuring": False, "stop": False}

    async def submitter(c: Client) -> None:
        while not state["stop"]:
            t0 = time.perf_counter()
            view = await c.submit("echo", PAYLOAD)
            if state["measuring"]:
                lat.append((time.perf_counter() - t0) * 1000)
                ids.append(view.request_id)

    tasks = [asyncio.ensure_future(submitter(clients[i % len(clients)])) for i in range(concurrency)]
    await asyncio.sleep(warm)
    state["measuring"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(duration)
    state["measuring"] = False
    elapsed = time.perf_counter() - t0
    state["stop"] = True
    await asyncio.gather(*tasks)
    # How many of the jobs acknowledged in the window had completed at its end (and later):
    c = clients[0]
    done_at_end = 0
    sample = ids[:: max(1, len(ids) // 200)]  # a sample: polling every job would be a load of its own
    for job_id in sample:
        view = await c.job(job_id)
        done_at_end += view.status == "COMPLETED"
    drained = 0
    for job_id in sample:
        view = await c.job(job_id, wait_ms=30_000)
        drained += view.status == "COMPLETED" and not view.error_type
    for cl in clients:
        await cl.close()
    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "submits": len(lat),
        "submits_per_s": len(lat) / elapsed,
        "submit_p50_ms": pct(lat, 50),
        "submit_p99_ms": pct(lat, 99),
        "sampled": len(sample),
        "completed_by_window_end": done_at_end,
        "completed_after_drain": drained,
    }


async def bench_backend(name: str, store: str, args: argparse.Namespace, procs: Procs, tmp: Path) -> dict[str, Any]:
    up = Up(procs, tmp, f'[queue.jobs]\nstore = "{store}"\n[[workers]]\nmodels = ["echo"]\ncount = 1\ncapacity = 64\n')
    c = await up.ready()
    for _ in range(50):  # warm both paths
        await c.run("echo", PAYLOAD)
        v = await c.submit("echo", PAYLOAD)
        await c.job_result(v.request_id, wait_ms=10_000)
    lat = await latency(c, args.pairs)
    await c.close()
    sus = await sustained(f"127.0.0.1:{up.frames}", up.key(), args.concurrency, args.duration, args.warm)
    up.proc.terminate()
    up.proc.wait(20)
    return {"backend": name, "latency_c1_1KiB": lat, "sustained": sus}


def report(results: list[dict[str, Any]]) -> None:
    print("\nasync vs sync, echo 1 KiB, raw frames through casola up (ms)")
    print(f"{'backend':<10} {'sync p50':>9} {'sync p99':>9} {'async p50':>10} {'async p99':>10} {'extra p50':>10}")
    for r in results:
        x = r["latency_c1_1KiB"]
        print(
            f"{r['backend']:<10} {x['sync_p50_ms']:>9.3f} {x['sync_p99_ms']:>9.3f} {x['async_p50_ms']:>10.3f}"
            f" {x['async_p99_ms']:>10.3f} {x['overhead_p50_ms']:>10.3f}"
        )
    print("\nsustained async submits, 1 KiB")
    for r in results:
        s = r["sustained"]
        print(
            f"{r['backend']:<10} c={s['concurrency']} {s['submits_per_s']:,.0f} submits/s over {s['seconds']:.1f} s;"
            f" ack p50 {s['submit_p50_ms']:.2f} ms p99 {s['submit_p99_ms']:.2f} ms;"
            f" sampled {s['sampled']}: {s['completed_by_window_end']} done at window end,"
            f" {s['completed_after_drain']} after drain"
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    with tempfile.TemporaryDirectory(prefix="casola-bench-jobs-") as d:
        tmp = Path(d)
        procs = Procs(dict(os.environ), tmp)
        try:
            (tmp / "sqlite").mkdir()
            sqlite = f"sqlite:///{tmp}/sqlite/jobs.db"
            results.append(await bench_backend("sqlite", sqlite, args, procs, tmp / "sqlite"))
            if not args.no_pg:
                schema = f"casola_bench_{uuid.uuid4().hex[:8]}"
                (tmp / "pg").mkdir()
                try:
                    store = f"{args.pg_dsn}?schema={schema}"
                    results.append(await bench_backend("postgres", store, args, procs, tmp / "pg"))
                finally:
                    await drop_schema(args.pg_dsn, schema)
        finally:
            procs.stop()
    report(results)
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few pairs, short window (a smoke run)")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warm", type=float, default=2.0)
    ap.add_argument("--pg-dsn", default=PG_DSN)
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.duration, args.warm = 200, 3.0, 1.0
    import uvloop

    out = uvloop.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
