"""Model handlers through casola vs CTranslate2 called directly, same input, same run.

For each handler, rounds alternate: the direct call in this process (what a user's own script would
do: decode/tokenize, run CTranslate2, decode the output) and the same input through `casola up`
(HTTP ingress -> queue node -> worker process -> back), over one keep-alive connection with a lean
socket client. The figure is the ratio and the difference of medians.

- llm: time to first token (direct: template + tokenize + first `generate_tokens` step; casola: request
  sent -> first SSE content chunk read) and tokens/s after the first token, greedy, same token count.
- asr: WAV in -> text (direct: read WAV, resample, log-mel, `Whisper.generate`); real-time factor.
- tts: text -> WAV (direct: espeak-ng subprocess); time to first audio byte and total.
- classify: text -> verdict (direct: tokenize, `Encoder.forward_batch`, head).

Usage:
    python bench/handlers.py                      # tiny models (built offline now), CPU
    python bench/handlers.py --set demo           # the demo set (`casola models prepare-demo`)
    python bench/handlers.py --device cuda        # the GPU variant (same script) on a CUDA machine
    python bench/handlers.py --quick              # a few rounds, a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from floor import ROOT, Procs
from upstack import Up, pct

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T = time.perf_counter
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


class Http:
    """A minimal keep-alive HTTP/1.1 client over one socket: requests out, response bytes in as they
    come, timestamped, so the client adds as little as possible to what is measured."""

    def __init__(self, port: int, key: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.auth = f"Authorization: Bearer {key}\r\n".encode()

    def post(self, path: str, body: bytes, headers: dict[str, str], on_data: Callable[[bytes], bool]) -> bytes:
        """Send; feed the raw response (head + chunked body) to `on_data` until it returns True."""
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode() + self.auth
        head += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
        self.sock.sendall(head + body)
        buf = bytearray()
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("casola closed the connection")
            buf += data
            if on_data(bytes(buf)):
                return bytes(buf)


def _whole(buf: bytes) -> bool:
    """A complete response: Content-Length reached, or a chunked body walked to its last chunk and the
    blank line after its trailers (Server-Timing)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = buf[:end].lower()
    pos = end + 4
    if b"transfer-encoding: chunked" not in head:
        i = head.find(b"content-length:")
        return i >= 0 and len(buf) - pos >= int(head[i + 15 :].split(b"\r\n", 1)[0])
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return False
        size = int(buf[pos:nl].split(b";")[0], 16)
        if size == 0:
            return buf.startswith(b"\r\n", nl + 2) or buf.find(b"\r\n\r\n", nl) >= 0
        pos = nl + 2 + size + 2
        if pos > len(buf):
            return False


def _status(buf: bytes) -> int:
    return int(buf[9:12])


def _med(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def _row(name: str, direct: list[float], casola: list[float], unit: str = "ms") -> dict[str, Any]:
    d, c = _med(direct), _med(casola)
    return {
        "name": name,
        "unit": unit,
        "direct_p50": d,
        "direct_p99": pct(direct, 99),
        "casola_p50": c,
        "casola_p99": pct(casola, 99),
        "diff_p50": c - d,
        "ratio_p50": c / d if d else float("nan"),
        "n": len(casola),
    }


# -- llm ----------------------------------------------------------------------------------------------


def bench_llm(up: Up, http: Http, path: Path, device: str, compute: str, threads: int, rounds: int, tokens: int):
    import ctranslate2
    import jinja2.sandbox
    from tokenizers import Tokenizer

    gen = ctranslate2.Generator(str(path), device=device, compute_type=compute, intra_threads=threads)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    manifest = json.loads((path / "casola.json").read_text())
    opts = manifest.get("options", {})
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string((path / "chat_template.jinja").read_text())
    messages = [{"role": "user", "content": PROMPT}]
    if opts.get("system_prompt"):
        messages.insert(0, {"role": "system", "content": opts["system_prompt"]})
    kwargs: dict[str, Any] = {"max_length": tokens, "sampling_topk": 1, "end_token": opts.get("end_tokens")}
    if opts.get("repetition_penalty"):
        kwargs["repetition_penalty"] = opts["repetition_penalty"]
    if opts.get("ignore_eos"):
        kwargs["min_length"] = tokens
    request = json.dumps(
        {"model": path.name, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
         "max_tokens": tokens, "stream": True}
    ).encode()  # fmt: skip

    def direct() -> tuple[float, float, int]:
        t0 = T()
        text = template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
        first = last = 0.0
        n = 0
        for _step in gen.generate_tokens(tok.encode(text, add_special_tokens=False).tokens, **kwargs):
            last = T()
            first = first or last
            n += 1
        return first - t0, (n - 1) / (last - first) if n > 1 else float("nan"), n

    def through() -> tuple[float, float, int]:
        marks: list[float] = []
        seen = [0]

        def on_data(buf: bytes) -> bool:
            now = T()
            k = buf.count(b'"content":"', seen[0]) - buf.count(b'"content":""', seen[0])
            if k > 0:
                marks.extend([now] * k)
            seen[0] = max(0, len(buf) - 10)  # a marker (11 bytes) may straddle two reads; never counted twice
            return _whole(buf)

        t0 = T()
        buf = http.post("/openai/v1/chat/completions", request, {"Content-Type": "application/json"}, on_data)
        assert _status(buf) == 200, buf[:300]
        n = buf.count(b'"content":"') - buf.count(b'"content":""')
        first, last = (marks[0], marks[-1]) if marks else (0.0, 0.0)
        return first - t0, (n - 1) / (last - first) if n > 1 and last > first else float("nan"), n

    d_ttft, d_tps, c_ttft, c_tps = [], [], [], []
    counts = set()
    for i in range(rounds + 2):
        a, b, n1 = direct()
        c, d, n2 = through()
        counts.add((n1, n2))
        if i >= 2:  # warm-up rounds
            d_ttft.append(a * 1000)
            d_tps.append(b)
            c_ttft.append(c * 1000)
            c_tps.append(d)
    rows = [_row("llm ttft", d_ttft, c_ttft), _row("llm tokens/s", d_tps, c_tps, "tok/s")]
    rows[1]["tokens"] = sorted(counts)
    return rows


# -- asr / tts / classify ------------------------------------------------------------------------------


def _espeak(text: str) -> bytes:
    return subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], check=True, capture_output=True).stdout


def bench_asr(up: Up, http: Http, path: Path, device: str, compute: str, threads: int, rounds: int):
    import ctranslate2
    from tokenizers import Tokenizer

    from workers.audio import load_for_asr
    from workers.features import log_mel_spectrogram, pad_or_trim

    model = ctranslate2.models.Whisper(str(path), device=device, compute_type=compute, intra_threads=threads)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    beam = int(json.loads((path / "casola.json").read_text()).get("options", {}).get("beam_size", 1))
    wav = _espeak("What is the capital of France?")
    eot = tok.token_to_id("<|endoftext|>")
    prompt = ["<|startoftranscript|>"] + (["<|en|>", "<|transcribe|>"] if model.is_multilingual else [])
    ids = [tok.token_to_id(t) for t in [*prompt, "<|notimestamps|>"]]
    seconds = len(load_for_asr(wav)) / 16000

    def direct() -> tuple[float, str]:
        t0 = T()
        x = load_for_asr(wav)
        feats = pad_or_trim(log_mel_spectrogram(x, model.n_mels))[None]
        res = model.generate(ctranslate2.StorageView.from_array(feats), [ids], beam_size=beam, max_length=448)[0]
        text = tok.decode([i for i in res.sequences_ids[0] if i < eot]).strip()
        return T() - t0, text

    def through() -> tuple[float, str]:
        t0 = T()
        buf = http.post(
            f"/v1/run/{path.name}", wav, {"Content-Type": "audio/wav", "X-Casola-Param-language": "en"}, _whole
        )
        dt = T() - t0
        assert _status(buf) == 200, buf[:300]
        return dt, json.loads(buf[buf.find(b"\r\n\r\n") + 4 :])["text"]

    d, c = [], []
    texts = set()
    for i in range(rounds + 1):
        a, t1 = direct()
        b, t2 = through()
        texts.add((t1, t2.strip()))
        if i:
            d.append(a * 1000)
            c.append(b * 1000)
    row = _row("asr request", d, c)
    row["audio_s"] = seconds
    row["rtf_direct"] = row["direct_p50"] / 1000 / seconds
    row["rtf_casola"] = row["casola_p50"] / 1000 / seconds
    row["texts"] = sorted(texts)
    return [row]


def bench_tts(up: Up, http: Http, rounds: int):
    text = "Sure, turning on the lights now. Is there anything else I can do for you this evening?"

    def direct() -> tuple[float, float]:
        t0 = T()
        p = subprocess.Popen(["espeak-ng", "-v", "en-us", "--stdout"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(text.encode())
        p.stdin.close()
        first = p.stdout.read1(65536) and T()  # type: ignore[attr-defined]
        while p.stdout.read1(65536):  # type: ignore[attr-defined]
            pass
        p.wait()
        return first - t0, T() - t0

    def through() -> tuple[float, float]:
        first = [0.0]

        def on_data(buf: bytes) -> bool:
            end = buf.find(b"\r\n\r\n")
            if not first[0] and end >= 0 and len(buf) > end + 64:
                first[0] = T()
            return _whole(buf)

        t0 = T()
        buf = http.post("/v1/run/tts", text.encode(), {"X-Casola-Param-response_format": "wav"}, on_data)
        assert _status(buf) == 200, buf[:300]
        return first[0] - t0, T() - t0

    d1, d2, c1, c2 = [], [], [], []
    for i in range(rounds + 1):
        a, b = direct()
        c, d = through()
        if i:
            d1 += [a * 1000]
            d2 += [b * 1000]
            c1 += [c * 1000]
            c2 += [d * 1000]
    return [_row("tts first byte", d1, c1), _row("tts whole", d2, c2)]


def bench_classify(up: Up, http: Http, path: Path, device: str, compute: str, threads: int, rounds: int):
    import ctranslate2
    from tokenizers import Tokenizer

    enc = ctranslate2.Encoder(str(path), device=device, compute_type=compute, intra_threads=threads)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    head = np.load(path / "classifier.npz")
    text = "please say that again, the lights are still off in the kitchen " * 4

    def direct() -> float:
        t0 = T()
        out = enc.forward_batch([["[CLS]", *tok.encode(text).tokens[:510], "[SEP]"]])
        logits = np.asarray(out.pooler_output) @ head["weight"].T + head["bias"]
        e = np.exp(logits - logits.max())
        _ = (e / e.sum()).tolist()
        return T() - t0

    def through() -> float:
        t0 = T()
        buf = http.post(f"/v1/run/{path.name}", text.encode(), {"Content-Type": "text/plain"}, _whole)
        assert _status(buf) == 200, buf[:300]
        return T() - t0

    d, c = [], []
    for i in range(rounds + 2):
        a, b = direct(), through()
        if i >= 2:
            d.append(a * 1000)
            c.append(b * 1000)
    return [_row("classify request", d, c)]


# -- main -----------------------------------------------------------------------------------------------


def _config(models_dir: Path, models: dict[str, str], device: str, threads: int) -> str:
    toml = ""
    for name in models.values():
        toml += f'[models."{name}"]\ndevice = "{device}"\nthreads = {threads}\n'
    toml += '[[workers]]\nmodels = ["echo"]\n'
    for name in models.values():
        toml += f'[[workers]]\nmodels = ["{name}"]\ncapacity = 4\nthreads = 4\n'
    return toml


async def _ready(up: Up, models: list[str]) -> None:
    c = await up.ready(120)
    await c.close()
    await up.serving(models)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("tiny", "demo"), default="tiny")
    ap.add_argument("--models-dir", help="default: a fresh tiny set, or models/demo")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=0, help="CTranslate2 intra_threads, both ways (0: default)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--only", default="llm,asr,tts,classify")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rounds = 5 if args.quick else args.rounds
    from workers.device import pick_device

    device, compute = pick_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="casola-bench-models-"))
    if args.models_dir:
        models_dir = Path(args.models_dir).resolve()
    elif args.set == "demo":
        models_dir = (ROOT / "models" / "demo").resolve()
    else:
        from workers.tiny import build_tiny_set

        models_dir = tmp / "models"
        build_tiny_set(models_dir)
    only = args.only.split(",")
    names = {"llm": "chat-random" if args.set == "tiny" else "chat", "asr": "asr", "tts": "tts", "classify": "classify"}
    names = {k: v for k, v in names.items() if k in only and (models_dir / v).exists()}
    procs = Procs({**os.environ, "MALLOC_TOP_PAD_": "0"}, tmp)
    top = f'models_dir = "{models_dir}"\n'
    up = Up(procs, tmp / "up", _config(models_dir, names, args.device, args.threads), top)
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(_ready(up, list(names.values())))
        http = Http(up.http, up.key())
        th = args.threads
        print(f"device {device} ({compute}), models {models_dir}, {rounds} rounds, threads {th or 'default'}")
        if "llm" in names:
            rows += bench_llm(up, http, models_dir / names["llm"], device, compute, th, rounds, args.tokens)
        if "asr" in names:
            rows += bench_asr(up, http, models_dir / names["asr"], device, compute, th, rounds)
        if "tts" in names:
            rows += bench_tts(up, http, rounds)
        if "classify" in names:
            rows += bench_classify(up, http, models_dir / names["classify"], device, compute, th, rounds)
    finally:
        up.stop()
        procs.stop()
    print(f"{'':18} {'direct p50':>11} {'p99':>9} {'casola p50':>11} {'p99':>9} {'diff p50':>9} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['name']:18} {r['direct_p50']:11.3f} {r['direct_p99']:9.3f} {r['casola_p50']:11.3f} "
            f"{r['casola_p99']:9.3f} {r['diff_p50']:9.3f} {r['ratio_p50']:7.3f}  {r['unit']}"
        )
        extra = {k: v for k, v in r.items() if k in ("tokens", "audio_s", "rtf_direct", "rtf_casola", "texts")}
        if extra:
            print(f"{'':18} {extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
