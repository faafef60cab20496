"""Rule classifier benchmark: `RuleClassifier.scan` time for 1 KiB, 64 KiB and 1 MiB inputs.

Two rule sets: 10 terms; 1,000 terms + 5 patterns (an SSN, an e-mail address, a card number, a
prompt-injection phrase, a "how to build a ..." phrase). Terms are random lowercase words of 6-12
letters, matched case-insensitively. The inputs are seeded pseudo-text (lowercase words, digits,
punctuation, newlines) in which no rule matches, so every scan reads the whole input (the set scan
does anyway: it reports every matching rule). Inputs are `bytes`, as the receive path hands them.

Method: `perf_counter_ns`; per case a warm-up (the DFA's states are built lazily, on the first
scans; the first scan's time is reported as "cold"), then `--samples` samples, each timing a batch
of scans that lasts at least ~1 ms (one scan when a scan lasts longer); gc off while timing. p50 is
the median over the samples of the per-scan time; "min" the fastest sample. Also: `classify` on
1 KiB (the inline path, method call included), and how fast the main thread runs Python while
another thread scans 1 MiB inputs, against its pace alone (whether the scan releases the GIL).

Usage:  python bench/filter_rules.py [--quick] [--samples N] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import random
import statistics
import string
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python bench/filter_rules.py` without installing casola
    sys.path.insert(0, str(ROOT))

from casola.filter.rules import RuleClassifier  # noqa: E402

__all__ = ["main"]

KiB, MiB = 1024, 1024 * 1024
SIZES = (KiB, 64 * KiB, MiB)
PATTERNS = (
    r"\b\d{3}-\d{2}-\d{4}\b",
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+\.[A-Za-z]{2,}",
    r"\b(?:\d{4}[ -]?){3}\d{4}\b",
    r"(?i)ignore\s+(?:all\s+)?previous\s+instructions",
    r"(?i)how\s+to\s+(?:make|build)\s+a\s+(?:bomb|weapon)",
)
BATCH_NS = 1_000_000  # a sample lasts at least this long (many 1 KiB scans, one 1 MiB scan)


def text(rng: random.Random, size: int) -> bytes:
    """Seeded pseudo-text: words of 1-10 lowercase letters, numbers below 1,000, punctuation."""
    out: list[str] = []
    n = 0
    while n < size:
        r = rng.random()
        word = (
            str(rng.randrange(1000)) if r < 0.05 else "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 10)))
        )
        sep = rng.choice(". , ; \n") if r > 0.9 else " "
        out.append(word + sep)
        n += len(word) + len(sep)
    return "".join(out).encode()[:size]


def terms(rng: random.Random, n: int, corpus: bytes) -> list[str]:
    """`n` random words of 6-12 letters, none of which occurs in `corpus` (the inputs stay clean)."""
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(6, 12)))
        if word.encode() not in corpus:
            out.append(word)
    return out


def per_call_ns(fn: Callable[[], object], samples: int) -> tuple[float, float]:
    """Median and min over `samples` batches of the time per call."""
    t0 = time.perf_counter_ns()
    fn()
    once = max(1, time.perf_counter_ns() - t0)
    batch = max(1, BATCH_NS // once)
    xs: list[float] = []
    gc.disable()
    try:
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            for _ in range(batch):
                fn()
            xs.append((time.perf_counter_ns() - t0) / batch)
    finally:
        gc.enable()
    return statistics.median(xs), min(xs)


def cold_ns(rules: tuple[list[str], list[str]], data: bytes) -> float:
    rc = RuleClassifier(*rules)
    t0 = time.perf_counter_ns()
    rc.scan(data)
    return time.perf_counter_ns() - t0


def loop_progress(scan: Callable[[], object], reps: int) -> float:
    """How much pure-Python work the main thread gets done while another thread scans, as a fraction
    of what it does alone in the same time: about 1 if the scan releases the GIL and a core is free,
    about 0 if the scan holds the GIL (the interpreter cannot take it back from a C call)."""

    def spin(done: threading.Event, start: Callable[[], None]) -> float:
        start()
        t0, n = time.perf_counter_ns(), 0
        while not done.is_set():
            n += 1
        return n / (time.perf_counter_ns() - t0)

    def scanning(done: threading.Event) -> None:
        for _ in range(reps):
            scan()
        done.set()

    idle, busy = threading.Event(), threading.Event()
    alone = spin(idle, lambda: threading.Timer(0.02, idle.set).start())  # iterations per ns
    beside = spin(busy, lambda: threading.Thread(target=scanning, args=(busy,)).start())
    return beside / alone


def bench(samples: int) -> dict[str, Any]:
    rng = random.Random(20261123)
    inputs = {size: text(rng, size) for size in SIZES}
    small = terms(rng, 10, inputs[MiB])
    rule_sets = {"10 terms": (small, []), "1,000 terms + 5 patterns": (terms(rng, 1000, inputs[MiB]), list(PATTERNS))}
    results: dict[str, Any] = {}
    print(f"{'rules':26} {'input':>7} {'p50 us':>10} {'min us':>10} {'ns/byte':>8} {'MB/s':>7} {'cold us':>10}")
    for name, rules in rule_sets.items():
        rc = RuleClassifier(*rules)
        for size, data in inputs.items():
            assert not rc.scan(data).flagged, (name, size)  # the whole input is read
            cold = cold_ns(rules, data)
            for _ in range(3):
                rc.scan(data)
            p50, lo = per_call_ns(functools.partial(rc.scan, data), samples)
            results[f"{name}/{size}"] = {"p50_us": p50 / 1e3, "min_us": lo / 1e3, "cold_us": cold / 1e3}
            label = f"{size // KiB} KiB" if size < MiB else f"{size // MiB} MiB"
            print(
                f"{name:26} {label:>7} {p50 / 1e3:10,.1f} {lo / 1e3:10,.1f} {p50 / size:8.2f}"
                f" {size / p50 * 1e3:7,.0f} {cold / 1e3:10,.1f}"
            )
        p50, _ = per_call_ns(functools.partial(rc.classify, inputs[KiB], "text/plain", "m"), samples)
        progress = loop_progress(functools.partial(rc.scan, inputs[MiB]), 10)
        results[f"{name}/classify_1k_p50_us"] = p50 / 1e3
        results[f"{name}/loop_progress_during_scan"] = progress
        print(
            f"{'':26} classify(1 KiB), the inline path: p50 {p50 / 1e3:,.2f} us. While another thread scans"
            f" 1 MiB, this one runs Python at {progress:.0%} of its own pace"
            f" ({'GIL released' if progress > 0.2 else 'the scan HOLDS the GIL'})"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="7 samples per case (CI smoke, a few seconds)")
    ap.add_argument("--samples", type=int, default=41, help="samples per case (default 41)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON here")
    args = ap.parse_args(argv)
    samples = 7 if args.quick else args.samples
    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "samples": samples,
        "command": " ".join(["bench/filter_rules.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(
        f"casola rule classifier benchmark: CPython {env['python']}, {env['platform']}, {env['cpus']} CPUs,"
        f" {env['date']}, {samples} samples per case"
    )
    t0 = time.perf_counter()
    results = bench(samples)
    env["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n({env['elapsed_s']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
