"""Codec benchmark: casola's sans-I/O frame decoder and encoder, timed without sockets (STYLE §7).

All figures come from one run in one process, so they can be compared with each other:

1. Small frames. A REQUEST frame with RequestMeta(model="echo", deadline_ms=1000, trace=True), a
   64-byte payload and FLAG_END, and a DATA frame with no metadata. Decoding uses the production
   receive path, `FrameDecoder.writable()` + `commit(n)`: a pre-encoded stream of frames (four
   receive buffers' worth) is copied into the `writable()` slices, as `recv_into` would, and only
   frames are counted. Encoding is one `encode_frame()` call per frame. Target: >= 500,000 decodes
   per second per core for frames that carry metadata.
2. Large DATA payloads (64 KiB, 1 MiB, 8 MiB), decoded in place: the header is fed first, then the
   payload is copied into `writable()` (the payload's own buffer) in the slices the decoder asks for.
   "fill" is the same copies into a preallocated bytearray: what `recv_into` costs anyway. "own" is
   total minus fill: what the decoder adds. It must not grow like a payload copy. Receiving into a
   buffer the receiver then owns needs a fresh buffer per frame, so `bytearray(size)` alone ("alloc")
   is timed too; own minus alloc is the parsing and bookkeeping. Encoding returns `[head, payload]`
   and lends the payload object itself.
3. The baseline to beat: the same 1 MiB payload as base64 in JSON (msgspec, and stdlib json +
   base64), with wire size, encode and decode time, against a casola REQUEST frame carrying it.
4. A mix of every valid case in protocol/vectors/*.json, concatenated and decoded as one stream.

Method: `time.perf_counter_ns`; a warm-up that doubles the iteration count until a repetition lasts
a quarter of its target, which also calibrates it; gc disabled while timing; the compared operations
are interleaved within each repetition; figures are medians with the min-max over repetitions.

Usage:  python bench/codec.py [--quick] [--json PATH] [--vectors DIR]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python bench/codec.py` without installing casola
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from casola.wire import (  # noqa: E402
    FLAG_END,
    Frame,
    FrameDecoder,
    FrameType,
    RemoteProtocolError,
    RequestMeta,
    encode_frame,
)

Op = Callable[[int], int]  # runs `iters` iterations and returns how many items (frames, messages) it handled
KiB, MiB = 1024, 1024 * 1024
SMALL_STREAM = 256 * KiB  # four default receive buffers, so frames straddle buffer ends as on a socket
LARGE_SIZES = (64 * KiB, MiB, 8 * MiB)
TARGET_DECODES = 500_000


class Stat(NamedTuple):
    """Nanoseconds per item over the repetitions."""

    med: float
    lo: float
    hi: float

    @classmethod
    def of(cls, xs: list[float]) -> Stat:
        return cls(statistics.median(xs), min(xs), max(xs))

    def rate(self, unit: float = 1.0) -> tuple[float, float, float]:
        """Items (times `unit`) per second: median, min, max."""
        return (unit * 1e9 / self.med, unit * 1e9 / self.hi, unit * 1e9 / self.lo)

    def js(self, unit: float = 1e3) -> dict[str, float]:
        return {"median": self.med / unit, "min": self.lo / unit, "max": self.hi / unit}


class Timer:
    def __init__(self, reps: int, target_s: float) -> None:
        self.reps, self.target_ns = reps, target_s * 1e9
        self.last: dict[str, list[float]] = {}  # ns per item of each repetition of the last run

    @staticmethod
    def _timed(op: Op, iters: int) -> tuple[int, int]:
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            items = op(iters)
            return time.perf_counter_ns() - t0, items
        finally:
            gc.enable()

    def _calibrate(self, op: Op) -> int:
        iters = 1
        while True:  # doubles as the warm-up
            dt, _ = self._timed(op, iters)
            if dt >= self.target_ns / 4:
                return max(1, round(iters * self.target_ns / dt))
            iters *= 2

    def run(self, ops: dict[str, Op]) -> dict[str, Stat]:
        """Interleaved repetitions of every op; ns per item."""
        iters = {name: self._calibrate(op) for name, op in ops.items()}
        samples: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(self.reps):
            for name, op in ops.items():
                dt, items = self._timed(op, iters[name])
                samples[name].append(dt / items)
        self.last = samples
        return {name: Stat.of(xs) for name, xs in samples.items()}

    def diff(self, a: str, *minus: str) -> Stat:
        """`a` minus the `minus` ops, per repetition of the last run (they ran side by side)."""
        return Stat.of([x - sum(ys) for x, *ys in zip(self.last[a], *(self.last[m] for m in minus), strict=True)])


def us(s: Stat) -> str:
    return f"{s.med / 1e3:,.1f} ({s.lo / 1e3:,.1f}-{s.hi / 1e3:,.1f})"


def wire_of(frame: Frame) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(frame))


def stream_decode_op(stream: bytes) -> Op:
    """Decode `stream` (whole frames) per iteration through writable()/commit(); counts frames."""
    dec, src, size = FrameDecoder(), memoryview(stream), len(stream)

    def op(iters: int) -> int:
        writable, commit, frames = dec.writable, dec.commit, 0
        for _ in range(iters):
            pos = 0
            while pos < size:
                dst = writable()
                n = min(len(dst), size - pos)
                dst[:n] = src[pos : pos + n]
                pos += n
                frames += len(commit(n))
        return frames

    return op


def encode_op(frame: Frame) -> Op:
    def op(iters: int) -> int:
        enc = encode_frame
        for _ in range(iters):
            enc(frame)
        return iters

    return op


def in_place_ops(frame: Frame) -> tuple[Op, Op, Frame]:
    """Decode one large frame in place (header first, then writable() slices), the same copies into a
    preallocated bytearray, and the frame decoded once for checking."""
    wire = wire_of(frame)
    src, head_len = memoryview(wire), len(wire) - len(frame.payload)
    dec = FrameDecoder()
    cuts: list[tuple[int, int]] = [(0, head_len)]  # (offset, length) of each copy, replayed by `fill`
    dst = dec.writable()
    dst[:head_len] = src[:head_len]
    got = dec.commit(head_len)
    assert got == [], "a frame before its payload"
    pos = head_len
    while pos < len(wire):
        dst = dec.writable()
        n = min(len(dst), len(wire) - pos)
        dst[:n] = src[pos : pos + n]
        cuts.append((pos, n))
        pos += n
        got += dec.commit(n)
    assert len(got) == 1, got

    def decode(iters: int) -> int:
        writable, commit, end = dec.writable, dec.commit, len(wire)
        for _ in range(iters):
            dst = writable()
            dst[:head_len] = src[:head_len]
            commit(head_len)
            pos = head_len
            while pos < end:
                dst = writable()
                n = min(len(dst), end - pos)
                dst[:n] = src[pos : pos + n]
                pos += n
                commit(n)
        return iters

    plain = memoryview(bytearray(len(wire)))

    def fill(iters: int) -> int:
        for _ in range(iters):
            for off, n in cuts:
                plain[off : off + n] = src[off : off + n]
        return iters

    return decode, fill, got[0]


def check_in_place(got: Frame, frame: Frame) -> None:
    p = got.payload
    assert isinstance(p, memoryview), f"payload is {type(p).__name__}, expected memoryview"
    assert isinstance(p.obj, bytearray) and len(p.obj) == len(frame.payload), "payload is not its own buffer"
    assert p == memoryview(frame.payload), "payload contents differ"
    assert (got.type, got.stream_id, got.meta, got.flags) == (frame.type, frame.stream_id, frame.meta, frame.flags)


def check_encode_lends(frame: Frame) -> None:
    out = encode_frame(frame)
    assert len(out) == 2 and out[1] is frame.payload, "encode_frame copied or concatenated the payload"


def bench_small(t: Timer) -> dict[str, Any]:
    frames = {
        "REQUEST+meta": Frame(
            FrameType.REQUEST, 1, RequestMeta(model="echo", deadline_ms=1000, trace=True), b"x" * 64, FLAG_END
        ),
        "DATA": Frame(FrameType.DATA, 1, None, b"x" * 64, FLAG_END),
    }
    ops: dict[str, Op] = {}
    for name, frame in frames.items():
        wire = wire_of(frame)
        back = FrameDecoder().receive_data(wire)
        assert back == [frame] and wire_of(back[0]) == wire, f"{name} does not round-trip"
        ops[f"decode {name}"] = stream_decode_op(wire * -(-SMALL_STREAM // len(wire)))
        ops[f"encode {name}"] = encode_op(frame)
    stats = t.run(ops)
    print("\n1. Small frames, 64 B payload (frames/s and ns/frame: median (min-max))")
    print(f"{'op':<22}{'wire B':>7}  {'frames/s':<34}{'ns/frame':<22}")
    res: dict[str, Any] = {}
    for name, s in stats.items():
        size = len(wire_of(frames[name.split(" ", 1)[1]]))
        r = s.rate()
        print(f"{name:<22}{size:>7}  {f'{r[0]:,.0f} ({r[1]:,.0f}-{r[2]:,.0f})':<34}"
              f"{s.med:,.0f} ({s.lo:,.0f}-{s.hi:,.0f})")
        res[name] = {"wire_bytes": size, "frames_per_s": {"median": r[0], "min": r[1], "max": r[2]},
                     "ns_per_frame": s.js(1.0)}
    return res


def bench_large(t: Timer, rng: random.Random) -> dict[str, Any]:
    print("\n2. Large DATA payloads, in-place decode (us: median (min-max); GB/s of the median)")
    print(f"{'payload':>8}  {'decode total':<22}{'GB/s':>6}  {'fill':<22}{'GB/s':>6}  {'decoder own':<20}"
          f"{'GB/s':>7}  {'alloc':<20}{'own-alloc':>10}  {'encode':<16}")
    res: dict[str, Any] = {}
    for size in LARGE_SIZES:
        payload = rng.randbytes(size)
        frame = Frame(FrameType.DATA, 1, None, payload, 0)
        decode, fill, got = in_place_ops(frame)
        check_in_place(got, frame)
        check_encode_lends(frame)
        del got

        def alloc(iters: int, size: int = size) -> int:
            for _ in range(iters):
                bytearray(size)
            return iters

        s = t.run({"decode": decode, "fill": fill, "alloc": alloc, "encode": encode_op(frame)})
        own, bare = t.diff("decode", "fill"), t.diff("decode", "fill", "alloc")
        label = f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"
        print(f"{label:>8}  {us(s['decode']):<22}{size / s['decode'].med:>6.1f}  {us(s['fill']):<22}"
              f"{size / s['fill'].med:>6.1f}  {us(own):<20}{size / own.med:>7.1f}  {us(s['alloc']):<20}"
              f"{bare.med / 1e3:>10.1f}  {us(s['encode']):<16}")
        res[label] = {
            "bytes": size, "decode_total_us": s["decode"].js(), "fill_us": s["fill"].js(),
            "decoder_own_us": own.js(), "alloc_us": s["alloc"].js(), "own_minus_alloc_us": bare.js(),
            "encode_us": s["encode"].js(), "decode_total_gbps": size / s["decode"].med,
            "fill_gbps": size / s["fill"].med, "decoder_own_gbps": size / own.med,
            "encode_gbps": size / s["encode"].med, "payload_memoryview_checked": True,
            "encode_lends_payload_checked": True,
        }
    return res


class Msg(msgspec.Struct):
    id: int
    model: str
    data: bytes  # msgspec JSON writes bytes as base64


def bench_baseline(t: Timer, rng: random.Random) -> dict[str, Any]:
    payload = rng.randbytes(MiB)
    frame = Frame(FrameType.REQUEST, 1, RequestMeta(model="echo"), payload, FLAG_END)
    decode, _, got = in_place_ops(frame)
    check_in_place(got, frame)
    check_encode_lends(frame)
    del got
    menc, mdec = msgspec.json.Encoder(), msgspec.json.Decoder(Msg)
    msg = Msg(1, "echo", payload)
    m_wire = menc.encode(msg)
    s_wire = json.dumps({"id": 1, "model": "echo", "data": base64.b64encode(payload).decode("ascii")}).encode()
    assert mdec.decode(m_wire) == msg and base64.b64decode(json.loads(s_wire)["data"]) == payload

    def loop(fn: Callable[[], object]) -> Op:
        def op(iters: int) -> int:
            for _ in range(iters):
                fn()
            return iters

        return op

    def s_enc() -> bytes:
        return json.dumps({"id": 1, "model": "echo", "data": base64.b64encode(payload).decode("ascii")}).encode()

    def s_dec() -> bytes:
        d = json.loads(s_wire)
        return base64.b64decode(d["data"])

    s = t.run({
        "casola enc": encode_op(frame), "casola dec": decode,
        "msgspec enc": loop(lambda: menc.encode(msg)), "msgspec dec": loop(lambda: mdec.decode(m_wire)),
        "stdlib enc": loop(s_enc), "stdlib dec": loop(s_dec),
    })
    raw = len(wire_of(frame))
    rows = {
        "casola REQUEST frame": ("casola", raw),
        "msgspec JSON, base64 bytes": ("msgspec", len(m_wire)),
        "stdlib json + base64": ("stdlib", len(s_wire)),
    }
    base = s["casola enc"].med + s["casola dec"].med
    print("\n3. Baseline, same 1 MiB payload (us: median (min-max); casola decode includes the fill)")
    print(f"{'format':<28}{'wire bytes':>11}{'overhead':>9}  {'encode us':<24}{'decode us':<24}"
          f"{'enc+dec us':>11}{'x casola':>10}")
    res: dict[str, Any] = {}
    for name, (key, size) in rows.items():
        enc, dec = s[f"{key} enc"], s[f"{key} dec"]
        both = enc.med + dec.med
        print(f"{name:<28}{size:>11,}{(size / raw - 1) * 100:>8.1f}%  {us(enc):<24}{us(dec):<24}"
              f"{both / 1e3:>11,.1f}{both / base:>9.1f}x")
        res[key] = {"wire_bytes": size, "overhead_pct": (size / raw - 1) * 100, "encode_us": enc.js(),
                    "decode_us": dec.js(), "enc_dec_us": both / 1e3, "ratio_vs_casola": both / base}
    return res


def load_vectors(directory: Path) -> tuple[list[bytes], list[str]]:
    """Valid, connection-free cases that decode alone to one frame; and the names of those skipped."""
    cases: list[bytes] = []
    skipped: list[str] = []
    for path in sorted(directory.glob("*.json")):
        for case in json.loads(path.read_text()).get("cases", []):
            if "frame" not in case or "connection" in case:
                continue
            raw = bytes.fromhex(case["hex"])
            try:
                ok = len(FrameDecoder().receive_data(raw)) == 1
            except RemoteProtocolError:
                ok = False
            if ok:
                cases.append(raw)
            else:
                skipped.append(f"{path.stem}/{case.get('name')}")
    return cases, skipped


def bench_vectors(t: Timer, directory: Path) -> dict[str, Any]:
    print(f"\n4. Vector mix ({directory})")
    cases, skipped = load_vectors(directory) if directory.is_dir() else ([], [])
    if skipped:
        print(f"   skipped {len(skipped)} valid case(s) that do not decode alone to one frame: {skipped}")
    if not cases:
        note = "no valid vectors found yet; section skipped"
        print(f"   {note}")
        return {"skipped": note, "not_decodable": skipped}
    mix = b"".join(cases)
    s = t.run({"mix": stream_decode_op(mix * -(-SMALL_STREAM // len(mix)))})["mix"]
    r = s.rate()
    print(f"   {len(cases)} frames, {len(mix):,} B per pass: {r[0]:,.0f} frames/s ({r[1]:,.0f}-{r[2]:,.0f}),"
          f" {s.med:,.0f} ns/frame ({s.lo:,.0f}-{s.hi:,.0f})")
    return {"cases": len(cases), "mix_bytes": len(mix), "frames_per_s": {"median": r[0], "min": r[1], "max": r[2]},
            "ns_per_frame": s.js(1.0), "not_decodable": skipped}


def summary(res: dict[str, Any]) -> dict[str, Any]:
    dps = res["small"]["decode REQUEST+meta"]["frames_per_s"]["median"]
    large = res["large"]
    bare = [v["own_minus_alloc_us"]["median"] for v in large.values()]
    copy_8m = large["8 MiB"]["fill_us"]["median"]  # what one more copy of an 8 MiB payload would cost
    no_copy = max(bare) < 0.25 * copy_8m and bare[-1] < 0.25 * copy_8m
    b = res["baseline"]
    out = {
        "small_decodes_per_s_ge_500k": dps >= TARGET_DECODES,
        "large_no_payload_copy": no_copy,
        "json_base64_ms": {k: b[k]["enc_dec_us"] / 1e3 for k in ("msgspec", "stdlib")},
        "json_overhead_pct": b["msgspec"]["overhead_pct"],
    }
    print("\nTargets")
    print(f"   small REQUEST+meta decodes/s per core: {dps:,.0f} (>= {TARGET_DECODES:,}: "
          f"{'yes' if out['small_decodes_per_s_ge_500k'] else 'NO'})")
    print(f"   in-place decode beyond fill + fresh buffer, us (64 KiB / 1 MiB / 8 MiB): "
          f"{' / '.join(f'{x:.1f}' for x in bare)}; one more 8 MiB copy would be {copy_8m:.0f} us"
          f" -> no payload copy: {'yes' if no_copy else 'NO'}")
    print(f"   JSON+base64 of 1 MiB: msgspec {out['json_base64_ms']['msgspec']:.2f} ms, stdlib "
          f"{out['json_base64_ms']['stdlib']:.2f} ms per encode+decode, {out['json_overhead_pct']:+.1f}% bytes")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="3 short repetitions (CI smoke, < 15 s)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON here")
    ap.add_argument("--vectors", type=Path, default=ROOT / "protocol" / "vectors", metavar="DIR")
    args = ap.parse_args(argv)
    reps, target_s = (3, 0.03) if args.quick else (7, 0.2)
    t, rng = Timer(reps, target_s), random.Random(20261123)
    env = {
        "date": datetime.date.today().isoformat(), "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(), "reps": reps, "rep_target_s": target_s,
        "quick": args.quick, "msgspec": msgspec.__version__, "command": " ".join(["bench/codec.py", *sys.argv[1:]]),
    }
    print(f"casola codec benchmark: CPython {env['python']}, {env['platform']}, {env['cpus']} CPUs,"
          f" {env['date']}, {reps} reps of ~{target_s * 1e3:.0f} ms{' (quick)' if args.quick else ''}")
    t0 = time.perf_counter()
    res: dict[str, Any] = {"env": env}
    res["small"] = bench_small(t)
    res["large"] = bench_large(t, rng)
    res["baseline"] = bench_baseline(t, rng)
    res["vectors"] = bench_vectors(t, args.vectors)
    res["targets"] = summary(res)
    env["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n({env['elapsed_s']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
