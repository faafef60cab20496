"""Job store benchmark: durable submits per second and their latency, SQLite and PostgreSQL.

Each case opens a fresh store: SQLite in a file in a temporary directory (WAL, synchronous=FULL,
group commit), PostgreSQL in a temporary schema `casola_bench_<random>` (dropped afterwards;
synchronous_commit as the server has it, `on` by default). Every submit is durable when it returns.
`--concurrency` submitters (coroutines, one event loop, uvloop when installed) submit in a loop for
`--duration` seconds after a warm-up; each submit's latency is timed with `perf_counter`.
Reported: submits/s over the timed window, p50 and p99 latency, and for SQLite the mean number of
operations per commit (what group commit buys). Target: >= 1,000 durable submits/s (SQLite).

Jobs are 1 KiB payloads with small params and no idempotency key (`--idempotent` gives each one a
key, which adds the key lookup).

Usage:  python bench/store.py [--quick] [--json PATH] [--concurrency 1,64] [--duration S]
                              [--pg-dsn URL | --no-pg]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python bench/store.py` without installing casola
    sys.path.insert(0, str(ROOT))

from casola.store import JobStore, NewJob, StoreError  # noqa: E402
from casola.store.postgres import PostgresJobStore  # noqa: E402
from casola.store.sqlite import SqliteJobStore  # noqa: E402

__all__ = ["main"]

TARGET_SUBMITS = 1000
PAYLOAD = os.urandom(1024)
PARAMS = {"prompt": "a lighthouse at dusk", "steps": 30, "seed": 42}


async def run_case(store: JobStore, concurrency: int, duration_s: float, idempotent: bool) -> dict[str, Any]:
    """Submit from `concurrency` coroutines for `duration_s`; latencies in ms."""
    latencies: list[float] = []
    stop = False

    async def submitter(n: int) -> None:
        i = 0
        while not stop:
            key = f"{n}-{i}-{uuid.uuid4().hex}" if idempotent else ""
            job = NewJob(tenant=f"tenant-{n % 8}", model="img", payload=PAYLOAD, params=PARAMS, idempotency_key=key)
            t0 = time.perf_counter()
            await store.submit(job, time.time())
            latencies.append((time.perf_counter() - t0) * 1e3)
            i += 1

    async def timed(window_s: float) -> tuple[int, float]:
        nonlocal stop
        stop, latencies[:] = False, []
        tasks = [asyncio.create_task(submitter(n)) for n in range(concurrency)]
        t0 = time.perf_counter()
        await asyncio.sleep(window_s)
        stop = True
        await asyncio.gather(*tasks)
        return len(latencies), time.perf_counter() - t0

    await timed(min(0.5, duration_s / 4))  # warm-up: connections, statement caches, file growth
    commits0 = getattr(store, "commits", 0)
    n, elapsed = await timed(duration_s)
    commits = getattr(store, "commits", 0) - commits0
    qs = statistics.quantiles(latencies, n=100)
    out = {"submits": n, "submits_per_s": n / elapsed, "p50_ms": statistics.median(latencies), "p99_ms": qs[98]}
    if commits:
        out["ops_per_commit"] = n / commits
    return out


async def bench_backend(
    name: str, make: Callable[[], JobStore], args: argparse.Namespace, results: dict[str, Any]
) -> None:
    for concurrency in args.concurrency:
        store = make()
        await store.open()
        try:
            res = await run_case(store, concurrency, args.duration, args.idempotent)
        finally:
            await store.close()
        results[f"{name}/c{concurrency}"] = res
        extra = f"  {res['ops_per_commit']:5.1f} submits/commit" if "ops_per_commit" in res else ""
        print(
            f"{name:10} c={concurrency:<3} {res['submits_per_s']:9,.0f} submits/s"
            f"  p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms{extra}"
        )


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="casola-bench-store-") as tmp:
        path = os.path.join(tmp, "jobs.db")
        counter = iter(range(1_000_000))
        await bench_backend("sqlite", lambda: SqliteJobStore(f"{path}.{next(counter)}"), args, results)
    if args.no_pg:
        return results
    schema = f"casola_bench_{uuid.uuid4().hex[:12]}"
    try:
        await bench_backend("postgresql", lambda: PostgresJobStore(args.pg_dsn, schema=schema), args, results)
    except StoreError as exc:
        print(f"postgresql skipped: {exc}")
        results["postgresql"] = {"skipped": str(exc)}
    finally:
        try:
            await drop_schema(args.pg_dsn, schema)
        except (OSError, StoreError) as exc:  # unreachable: nothing to drop
            print(f"(schema {schema} not dropped: {exc})")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="1 s per case (CI smoke)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON here")
    ap.add_argument("--concurrency", default="1,64", help="comma-separated submitter counts (default 1,64)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per timed case (default 5)")
    ap.add_argument("--idempotent", action="store_true", help="give every job an idempotency key")
    ap.add_argument(
        "--pg-dsn", default=os.environ.get("CASOLA_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    )
    ap.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.duration = 1.0
    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "duration_s": args.duration,
        "command": " ".join(["bench/store.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(f"casola job store benchmark: CPython {env['python']}, {env['platform']}, {env['cpus']} CPUs, {env['date']}")
    try:
        import uvloop
    except ImportError:
        results = asyncio.run(bench(args))
        env["loop"] = "asyncio"
    else:
        results = uvloop.run(bench(args))
        env["loop"] = f"uvloop {uvloop.__version__}"
    sqlite_best = max((r["submits_per_s"] for k, r in results.items() if k.startswith("sqlite/")), default=0.0)
    verdict = "meets" if sqlite_best >= TARGET_SUBMITS else "MISSES"
    print(f"SQLite best {sqlite_best:,.0f} durable submits/s: {verdict} the {TARGET_SUBMITS:,}/s target")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
