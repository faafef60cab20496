"""Does Server-Timing add up? Four answer shapes against a real `casola up`, measured by the client.

One `casola up` (uvloop) with an echo worker; a raw HTTP/1.1 client on loopback sends each shape
`--reps` times over a fresh connection (`X-Casola-Trace: 1`) and takes, with CLOCK_MONOTONIC, the
time from the request's first byte written to the answer's first byte and to its last byte read:

- whole: 64 KiB in, echo after 20 ms of work, one Content-Length answer;
- streamed: 4 chunks 100 ms apart (header at the first byte, totals in the trailer);
- slow upload: a chunked body of three pieces and the last chunk, 0.3 s apart;
- slow first chunk: the response head at once, the first body byte 200 ms later.

For each: the median of the header's top-level stages (upload + ingress + queue-overhead + wait +
worker-rtt) against the client's first byte (a streamed answer) or last byte (a whole one), the
trailer's against the last byte, and the header's `ingress` and `upload`. The difference is what no
stage can hold: the loopback transit, the ingress <-> queue node link, the client's own parsing.

Usage:  python bench/timing_sums.py [--reps N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from floor import BenchError, Procs
from upstack import Up

TOP = ("upload", "ingress", "queue-overhead", "wait", "worker-rtt")
SHAPES: dict[str, tuple[dict[str, str], list[bytes], float, bool]] = {
    "whole": ({"delay-ms": "20"}, [os.urandom(64 * 1024)], 0.0, False),
    "streamed": ({"chunks": "4", "chunk-delay-ms": "100"}, [b"abcdefgh"], 0.0, False),
    "slow upload": ({}, [b"one", b"two", b"six"], 0.3, True),
    "slow first chunk": ({"head-first": "1", "delay-ms": "200", "chunks": "2"}, [b"abcd"], 0.0, False),
}


def parse_timing(value: str) -> dict[str, float]:
    out = {}
    for part in value.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


async def one(port: int, key: str, shape: str) -> dict[str, Any]:
    params, pieces, gap, chunked = SHAPES[shape]
    lines = ["POST /v1/run/echo HTTP/1.1", "Host: bench", f"Authorization: Bearer {key}", "X-Casola-Trace: 1"]
    lines += [f"X-Casola-Param-{k}: {v}" for k, v in params.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {sum(map(len, pieces))}")
    body = [b"%x\r\n%b\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"] if chunked else pieces
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    for i, piece in enumerate(body):
        if i and gap:
            await asyncio.sleep(gap)
        writer.write(piece)
    head = await reader.readuntil(b"\r\n\r\n")
    t_first = time.perf_counter()
    fields = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if line:
            k, _, v = line.partition(": ")
            fields[k.lower()] = v
    trailer: dict[str, float] = {}
    if "content-length" in fields:
        await reader.readexactly(int(fields["content-length"]))
    else:
        while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
            await reader.readexactly(size + 2)
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            k, _, v = line.decode("latin-1").partition(":")
            if k.strip().lower() == "server-timing":
                trailer = parse_timing(v.strip())
    t_last = time.perf_counter()
    writer.close()
    return {
        "header": parse_timing(fields["server-timing"]),
        "trailer": trailer,
        "first_ms": (t_first - t0) * 1000,
        "last_ms": (t_last - t0) * 1000,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    streamed = bool(runs[0]["trailer"])
    head_sum = [sum(r["header"].get(s, 0.0) for s in TOP) for r in runs]
    out: dict[str, Any] = {
        "header_sum_ms": med(head_sum),
        "client_first_byte_ms": med([r["first_ms"] for r in runs]),
        "client_last_byte_ms": med([r["last_ms"] for r in runs]),
        "header_ingress_ms": med([r["header"]["ingress"] for r in runs]),
        "header_upload_ms": med([r["header"].get("upload", 0.0) for r in runs]),
        "header_worker_rtt_ms": med([r["header"]["worker-rtt"] for r in runs]),
    }
    against = [r["first_ms"] if streamed else r["last_ms"] for r in runs]
    out["header_unaccounted_ms"] = med([c - h for c, h in zip(against, head_sum, strict=True)])
    if streamed:
        tail_sum = [sum(r["trailer"].get(s, 0.0) for s in TOP) for r in runs]
        out["trailer_sum_ms"] = med(tail_sum)
        out["trailer_ingress_ms"] = med([r["trailer"]["ingress"] for r in runs])
        out["trailer_unaccounted_ms"] = med([r["last_ms"] - t for r, t in zip(runs, tail_sum, strict=True)])
    return out


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    procs = Procs(dict(os.environ), tmp)
    up = Up(procs, tmp / "up", '[[workers]]\nmodels = ["echo"]\ncapacity = 8\n')
    try:
        c = await up.ready()
        await c.close()
        key = up.key()
        out = {}
        for shape in SHAPES:
            await one(up.http, key, shape)  # warm
            out[shape] = summary([await one(up.http, key, shape) for _ in range(args.reps)])
        return out
    finally:
        up.stop()
        procs.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=20, help="requests per shape (default 20)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory() as d:
        try:
            out = uvloop.run(run(args, Path(d)))
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
