"""A worker process serving a stand-in `classify` model, for bench/filter.py's model classifier run.

`Classify` reads the request body, does a real scan (one compiled regular expression over the
bytes: a few terms and an SSN-like pattern), then sleeps `--classify-ms` (an async sleep, standing
for a small model's inference), and answers the verdict JSON the queue node's model classifier
expects: `{"flagged": bool, "label": str, "score": float}` (flagged when the scan matched).

It runs `casola.worker.WorkerRuntime` on uvloop (`casola.net.loop.run`), dials the queue node given
with `--queue`, authenticates with the worker key (`--credential-file`, e.g. `<state>/worker-key`
written by `casola up`), prints `READY <node-id>` once registered, and drains on SIGTERM.

Usage:  python bench/classify_worker.py --queue 127.0.0.1:PORT --credential-file STATE/worker-key
                                        [--classify-ms 2] [--capacity 16] [--pool sync]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from casola.net.loop import run as run_loop  # noqa: E402
from casola.worker import WorkerConfig, WorkerRuntime  # noqa: E402
from casola.worker.call import WorkCall  # noqa: E402

SCAN = re.compile(rb"(?i)\b(?:bomb[- ]?making|kill\s+all|credit\s+card\s+dump)\b|\b\d{3}-\d{2}-\d{4}\b")
_enc = msgspec.json.Encoder()


class Classify:
    name = "classify"

    def __init__(self, classify_ms: float) -> None:
        self.delay = classify_ms / 1000
        self.calls = 0

    async def __call__(self, call: WorkCall) -> None:
        body = await call.body()
        m = SCAN.search(bytes(body))
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        self.calls += 1
        verdict = {
            "flagged": m is not None,
            "label": m.group(0).decode(errors="replace") if m else "",
            "score": 1.0 if m else 0.0,
        }
        call.respond(_enc.encode(verdict), "application/json")


async def serve(args: argparse.Namespace) -> int:
    credential = Path(args.credential_file).read_text().strip()
    cfg = WorkerConfig(
        queue=args.queue, models=["classify"], capacity=args.capacity, pool=args.pool, node_id=args.node_id
    )
    runtime = WorkerRuntime(cfg, [Classify(args.classify_ms)], credential)
    await runtime.start()
    await runtime.wait_registered(timeout=20.0)
    print(f"READY {runtime.node_id}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got: list[int] = []

    def on_signal(sig: int) -> None:
        got.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    if got and got[0] == signal.SIGTERM:
        await runtime.drain(timeout=5.0)
    else:
        await runtime.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queue", action="append", required=True, help="queue node host:port (repeatable)")
    ap.add_argument("--credential-file", required=True, help="the worker key file (<state>/worker-key)")
    ap.add_argument("--classify-ms", type=float, default=2.0, help="simulated inference time per request")
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--pool", default="sync", choices=("sync", "async", "shared"))
    ap.add_argument("--node-id", default="classify-worker")
    args = ap.parse_args(argv)
    try:
        return run_loop(serve(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
