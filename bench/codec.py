"""Codec benchmark: casola's sans-I/O frame decoder and encoder, timed without sockets (STYLE §7).

Every figure comes from one run of one process, so the figures can be compared with each other:

1. Small frames: REQUEST with RequestMeta(model="echo", deadline_ms=1000, trace=True), a 64-byte
   payload and FLAG_END; DATA without metadata. Decoding takes the production path: a pre-encoded
   stream (four receive buffers' worth) is copied into `FrameDecoder.writable()` slices, as
   `recv_into` would, then `commit(n)`; only frames are counted. Encoding: one `encode_frame()` per
   frame. Target: >= 500,000 decodes/s per core for frames that carry metadata.
2. Large DATA payloads (64 KiB, 1 MiB, 8 MiB) decoded in place: header first, then the payload is
   copied into `writable()`, the payload's own buffer. "fill" = the same copies into a preallocated
   bytearray (what `recv_into` costs anyway); "own" = total - fill, what the decoder adds, which must
   not grow like a payload copy. The fresh buffer a receiver-owned payload needs is timed alone
   ("alloc", `bytearray(size)`); "rest" = own - alloc. `encode_frame` returns `[head, payload]`.
3. Baseline to beat: the same 1 MiB payload as base64 in JSON (msgspec; stdlib json + base64).
4. Every valid case of protocol/vectors/*.json, concatenated and decoded as one stream.

Method: `perf_counter_ns`; a warm-up that doubles the iterations until a repetition lasts a quarter
of its target also calibrates them; gc off while timing; the compared ops interleave within each
repetition; medians with min-max over the repetitions.

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

from casola.wire import FLAG_END, Frame, FrameDecoder, FrameType, RequestMeta, encode_frame  # noqa: E402
from casola.wire.errors import RemoteProtocolError  # noqa: E402

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

    def us(self) -> str:
        return f"{self.med / 1e3:,.1f} ({self.lo / 1e3:,.1f}-{self.hi / 1e3:,.1f})"

    def js(self, unit: float = 1e3) -> dict[str, float]:  # in units of `unit` ns (default: us)
        return {"median": self.med / unit, "min": self.lo / unit, "max": self.hi / unit}

    def rate(self) -> dict[str, float]:  # items per second; the slowest repetition gives the min
        return {"median": 1e9 / self.med, "min": 1e9 / self.hi, "max": 1e9 / self.lo}


class Timer:
    """Interleaved, calibrated, gc-free repetitions of a set of ops."""

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
        iters = {name: self._calibrate(op) for name, op in ops.items()}
        self.last = {name: [] for name in ops}
        for _ in range(self.reps):
            for name, op in ops.items():
                dt, items = self._timed(op, iters[name])
                self.last[name].append(dt / items)
        return {name: Stat.of(xs) for name, xs in self.last.items()}

    def diff(self, a: str, *minus: str) -> Stat:
        """`a` minus the `minus` ops, per repetition of the last run (they ran side by side)."""
        return Stat.of([x - sum(ys) for x, *ys in zip(self.last[a], *(self.last[m] for m in minus), strict=True)])


def repeat(fn: Callable[..., object], *args: object) -> Op:
    def op(iters: int) -> int:
        for _ in range(iters):
            fn(*args)
        return iters

    return op


def rate_str(r: dict[str, float]) -> str:
    return f"{r['median']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f})"


def triple(xs: list[float]) -> str:
    return " / ".join(f"{x:,.1f}" for x in xs)


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


def in_place_ops(frame: Frame) -> tuple[Op, Op]:
    """Decode one large frame in place (header first, then the writable() slices); and the same copies
    into a preallocated bytearray. Checks the result once, before anything is timed."""
    wire = wire_of(frame)
    src, end, head_len = memoryview(wire), len(wire), len(wire) - len(frame.payload)
    dec = FrameDecoder()

    def feed(cuts: list[tuple[int, int]] | None) -> list[Frame]:
        dst = dec.writable()
        dst[:head_len] = src[:head_len]
        out, pos = dec.commit(head_len), head_len
        while pos < end:
            dst = dec.writable()  # the payload's own buffer, once the header is in
            n = min(len(dst), end - pos)
            dst[:n] = src[pos : pos + n]
            if cuts is not None:
                cuts.append((pos, n))
            pos += n
            out += dec.commit(n)
        return out

    cuts = [(0, head_len)]  # (offset, length) of each copy the decoder asked for, replayed by `fill`
    check_large(feed(cuts), frame)

    def decode(iters: int) -> int:
        for _ in range(iters):
            feed(None)
        return iters

    plain = memoryview(bytearray(end))

    def fill(iters: int) -> int:
        for _ in range(iters):
            for off, n in cuts:
                plain[off : off + n] = src[off : off + n]
        return iters

    return decode, fill


def check_large(frames: list[Frame], frame: Frame) -> None:
    """The decoded payload is a memoryview of its own buffer with the right bytes, and encode_frame
    lends the payload object itself (no concatenation, no copy)."""
    assert len(frames) == 1, frames
    got, p = frames[0], frames[0].payload
    assert isinstance(p, memoryview), f"payload is {type(p).__name__}, expected memoryview"
    assert isinstance(p.obj, bytearray) and len(p.obj) == len(frame.payload), "payload is not its own buffer"
    assert p == memoryview(frame.payload), "payload contents differ"
    assert (got.type, got.stream_id, got.meta, got.flags) == (frame.type, frame.stream_id, frame.meta, frame.flags)
    out = encode_frame(frame)
    assert len(out) == 2 and out[1] is frame.payload, "encode_frame copied or concatenated the payload"


def bench_small(t: Timer) -> dict[str, Any]:
    meta = RequestMeta(model="echo", deadline_ms=1000, trace=True)
    frames = {
        "REQUEST+meta": Frame(FrameType.REQUEST, 1, meta, b"x" * 64, FLAG_END),
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
    print("\n1. Small frames, 64 B payload, FLAG_END (median (min-max) of the repetitions)")
    print(f"{'op':<22}{'wire B':>7}  {'frames/s':<36}{'ns/frame'}")
    res: dict[str, Any] = {}
    for name, st in stats.items():
        size = len(wire_of(frames[name.split(" ", 1)[1]]))
        print(f"{name:<22}{size:>7}  {rate_str(st.rate()):<36}{st.med:,.0f} ({st.lo:,.0f}-{st.hi:,.0f})")
        res[name] = {"wire_bytes": size, "frames_per_s": st.rate(), "ns_per_frame": st.js(1.0)}
    return res


def bench_large(t: Timer, rng: random.Random) -> dict[str, Any]:
    print(
        "\n2. Large DATA payloads (us: median (min-max); GB/s from the median). own = total - fill; rest = own - alloc"
    )
    print(
        f"{'payload':>8}  {'decode total us':<22}{'GB/s':>5}{'fill us':>9}{'GB/s':>6}  {'decoder own us':<20}"
        f"{'GB/s':>6}{'alloc us':>10}{'rest us':>9}  {'encode us':<16}{'GB/s':>7}"
    )
    res: dict[str, Any] = {}
    for size in LARGE_SIZES:
        frame = Frame(FrameType.DATA, 1, None, rng.randbytes(size), 0)
        decode, fill = in_place_ops(frame)
        st = t.run({"decode": decode, "fill": fill, "alloc": repeat(bytearray, size), "encode": encode_op(frame)})
        own, bare = t.diff("decode", "fill"), t.diff("decode", "fill", "alloc")
        label = f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"
        dec, fil, enc = st["decode"], st["fill"], st["encode"]
        print(
            f"{label:>8}  {dec.us():<22}{size / dec.med:>5.1f}{fil.med / 1e3:>9.1f}{size / fil.med:>6.1f}  "
            f"{own.us():<20}{size / own.med:>6.1f}{st['alloc'].med / 1e3:>10.1f}{bare.med / 1e3:>9.1f}  "
            f"{enc.us():<16}{size / enc.med:>7,.0f}"
        )
        res[label] = {
            "bytes": size,
            "decode_total_us": dec.js(),
            "fill_us": fil.js(),
            "decoder_own_us": own.js(),
            "alloc_us": st["alloc"].js(),
            "rest_us": bare.js(),
            "encode_us": enc.js(),
            "decode_total_gbps": size / dec.med,
            "fill_gbps": size / fil.med,
            "decoder_own_gbps": size / own.med,
            "encode_gbps": size / enc.med,
            "payload_is_own_memoryview": True,
            "encode_lends_payload": True,
        }
    return res


class Msg(msgspec.Struct):
    id: int
    model: str
    data: bytes  # msgspec JSON writes bytes as base64


def bench_baseline(t: Timer, rng: random.Random) -> dict[str, Any]:
    payload = rng.randbytes(MiB)
    frame = Frame(FrameType.REQUEST, 1, RequestMeta(model="echo"), payload, FLAG_END)
    decode, _ = in_place_ops(frame)
    menc, mdec = msgspec.json.Encoder(), msgspec.json.Decoder(Msg)
    msg = Msg(1, "echo", payload)
    m_wire = menc.encode(msg)

    def s_enc() -> bytes:
        return json.dumps({"id": 1, "model": "echo", "data": base64.b64encode(payload).decode("ascii")}).encode()

    def s_dec() -> bytes:
        return base64.b64decode(json.loads(s_wire)["data"])

    s_wire = s_enc()
    assert mdec.decode(m_wire) == msg and s_dec() == payload
    st = t.run(
        {
            "casola enc": encode_op(frame),
            "casola dec": decode,
            "msgspec enc": repeat(menc.encode, msg),
            "msgspec dec": repeat(mdec.decode, m_wire),
            "stdlib enc": repeat(s_enc),
            "stdlib dec": repeat(s_dec),
        }
    )
    raw = len(wire_of(frame))
    rows = {
        "casola": ("casola REQUEST frame", raw),
        "msgspec": ("msgspec JSON, base64 bytes", len(m_wire)),
        "stdlib": ("stdlib json + base64", len(s_wire)),
    }
    base = st["casola enc"].med + st["casola dec"].med
    print("\n3. Baseline, same 1 MiB payload (us: median (min-max); the casola decode includes the fill)")
    print(
        f"{'format':<28}{'wire bytes':>11}{'overhead':>9}  {'encode us':<27}{'decode us':<27}"
        f"{'enc+dec us':>10}{'x casola':>10}"
    )
    res: dict[str, Any] = {}
    for key, (name, size) in rows.items():
        enc, dec = st[f"{key} enc"], st[f"{key} dec"]
        both, over = enc.med + dec.med, (size / raw - 1) * 100
        print(
            f"{name:<28}{size:>11,}{over:>8.1f}%  {enc.us():<27}{dec.us():<27}{both / 1e3:>10,.1f}{both / base:>9.1f}x"
        )
        res[key] = {
            "wire_bytes": size,
            "overhead_pct": over,
            "encode_us": enc.js(),
            "decode_us": dec.js(),
            "enc_dec_us": both / 1e3,
            "ratio_vs_casola": both / base,
        }
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
        print(note := "   no valid vectors found yet (protocol/vectors/ is written in parallel); section skipped")
        return {"skipped": note.strip(), "not_decodable": skipped}
    mix = b"".join(cases)
    st = t.run({"mix": stream_decode_op(mix * -(-SMALL_STREAM // len(mix)))})["mix"]
    print(
        f"   {len(cases)} frames, {len(mix):,} B per pass: {rate_str(st.rate())} frames/s,"
        f" {st.med:,.0f} ({st.lo:,.0f}-{st.hi:,.0f}) ns/frame"
    )
    return {
        "cases": len(cases),
        "mix_bytes": len(mix),
        "frames_per_s": st.rate(),
        "ns_per_frame": st.js(1.0),
        "not_decodable": skipped,
    }


def summary(res: dict[str, Any]) -> dict[str, Any]:
    dps = res["small"]["decode REQUEST+meta"]["frames_per_s"]["median"]
    large, b = res["large"], res["baseline"]
    own, alloc, bare = ([v[k]["median"] for v in large.values()] for k in ("decoder_own_us", "alloc_us", "rest_us"))
    copy_8m = large["8 MiB"]["fill_us"]["median"]  # what one more copy of the 8 MiB payload costs
    out = {
        "small_decodes_per_s_ge_500k": dps >= TARGET_DECODES,
        "large_no_payload_copy": max(bare) < 0.25 * copy_8m,
        "json_base64_ms": {k: b[k]["enc_dec_us"] / 1e3 for k in ("msgspec", "stdlib")},
        "json_overhead_pct": b["msgspec"]["overhead_pct"],
    }
    print("\nTargets (64 KiB / 1 MiB / 8 MiB where three figures)")
    print(
        f"   small REQUEST+meta decodes/s per core: {dps:,.0f} (>= {TARGET_DECODES:,}: "
        f"{'yes' if out['small_decodes_per_s_ge_500k'] else 'NO'})"
    )
    print(
        f"   decoder own time beyond the fill: {triple(own)} us; of which the fresh bytearray(size): "
        f"{triple(alloc)} us; the rest: {triple(bare)} us"
    )
    print(
        f"   one more copy of 8 MiB would add {copy_8m:,.0f} us -> no payload copy: "
        f"{'yes' if out['large_no_payload_copy'] else 'NO'}"
    )
    print(
        f"   JSON+base64 of 1 MiB: msgspec {out['json_base64_ms']['msgspec']:.2f} ms, stdlib "
        f"{out['json_base64_ms']['stdlib']:.2f} ms per encode+decode, {out['json_overhead_pct']:+.1f}% bytes"
    )
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
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "reps": reps,
        "rep_target_s": target_s,
        "quick": args.quick,
        "msgspec": msgspec.__version__,
        "command": " ".join(["bench/codec.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(
        f"casola codec benchmark: CPython {env['python']}, {env['platform']}, {env['cpus']} CPUs,"
        f" {env['date']}, {reps} reps of ~{target_s * 1e3:.0f} ms{' (quick)' if args.quick else ''}"
    )
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "env": env,
        "small": bench_small(t),
        "large": bench_large(t, rng),
        "baseline": bench_baseline(t, rng),
        "vectors": bench_vectors(t, args.vectors),
    }
    res["targets"] = summary(res)
    env["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n({env['elapsed_s']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
