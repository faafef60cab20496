"""The voice-agent loop end to end through `casola up`, with Server-Timing per hop.

A spoken question (espeak-ng WAV) -> `/openai/v1/audio/transcriptions` -> the transcript as the user's
message -> `/openai/v1/chat/completions` (streamed) -> the answer -> `/openai/v1/audio/speech` (WAV,
streamed). Each hop's Server-Timing (header, or trailer for a streamed answer) is split into `work`
(the model) and platform overhead (ingress + queue-overhead + wait + worker-rtt - work).

Usage:
    casola models prepare-demo && python bench/voice_agent.py            # starts casola up itself
    python bench/voice_agent.py --models-dir DIR --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def _in_the_venv() -> None:
    """The README runs this as `python bench/voice_agent.py`, and a `python` other than the
    project's virtualenv has none of what bench/ imports (uvloop first: bench/floor.py imports it):
    re-run under <repo>/.venv's interpreter, or say what is missing."""
    try:
        import httpx  # noqa: F401
        import numpy  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError as exc:
        venv = Path(__file__).resolve().parent.parent / ".venv"
        python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
        if python.exists() and Path(sys.prefix).resolve() != venv.resolve():
            os.execv(python, [str(python), *sys.argv])
        hint = " (uvloop has no Windows build)" if sys.platform == "win32" and exc.name == "uvloop" else ""
        raise SystemExit(
            f"bench/voice_agent.py: no module {exc.name}{hint}; run it with the Python of the virtualenv "
            "that `pip install -e '.[workers,demo]'` made (.venv/bin/python bench/voice_agent.py)"
        ) from None


_in_the_venv()

from floor import ROOT, Procs  # noqa: E402  (after the check above)
from handlers import Http, _whole  # noqa: E402
from upstack import Up  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Turn on the lights in the kitchen."]
T = time.perf_counter


def _timing(buf: bytes) -> dict[str, float]:
    """Server-Timing from the head or the chunked trailer: {stage: ms}."""
    out: dict[str, float] = {}
    for line in buf.split(b"\r\n"):
        if line.lower().startswith(b"server-timing:"):
            for item in line.split(b":", 1)[1].decode().split(","):
                name, _, rest = item.strip().partition(";")
                if "dur=" in rest:
                    out[name] = float(rest.split("dur=")[1].split(";")[0])
    return out


def _platform(t: dict[str, float]) -> float:
    rtt = t.get("worker-rtt", 0.0)
    return t.get("ingress", 0.0) + t.get("queue-overhead", 0.0) + t.get("wait", 0.0) + max(rtt - t.get("work", 0), 0)


def _body(buf: bytes) -> bytes:
    head, _, rest = buf.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return rest
    out, pos = bytearray(), 0
    while True:
        nl = rest.find(b"\r\n", pos)
        size = int(rest[pos:nl].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += rest[nl + 2 : nl + 2 + size]
        pos = nl + 2 + size + 2


def _multipart(fields: dict[str, str], audio: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(
        f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="q.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n".encode()
        + audio
        + f"\r\n--{b}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={b}"


def loop(http: Http, question: str) -> list[tuple[str, float, dict[str, float], str]]:
    trace = {"X-Casola-Trace": "1"}
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", question], check=True, capture_output=True).stdout
    rows = []
    body, ctype = _multipart({"model": "asr", "response_format": "json", "language": "en"}, wav)
    t0 = T()
    buf = http.post("/openai/v1/audio/transcriptions", body, {**trace, "Content-Type": ctype}, _whole)
    answer_json = json.loads(_body(buf))
    if "text" not in answer_json:
        raise RuntimeError(f"transcription failed: {buf[:600]!r}")
    text = answer_json["text"].strip()
    rows.append(("asr", (T() - t0) * 1000, _timing(buf), text))
    req = {"model": "chat", "messages": [{"role": "user", "content": text}], "stream": True, "max_tokens": 48}
    t0 = T()
    first = [0.0]

    def on_chat(b: bytes) -> bool:
        if not first[0] and b'"content":"' in b.replace(b'"content":""', b""):
            first[0] = T()
        return _whole(b)

    buf = http.post("/openai/v1/chat/completions", json.dumps(req).encode(), {**trace}, on_chat)
    answer = "".join(
        (json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for e in _body(buf).decode().split("\n\n")
        if e.startswith("data: {")
    ).strip()
    rows.append(("llm", (T() - t0) * 1000, {**_timing(buf), "ttft": (first[0] - t0) * 1000}, answer))
    speech = {"model": "tts", "input": answer, "voice": "alloy", "response_format": "wav"}
    t0 = T()
    buf = http.post("/openai/v1/audio/speech", json.dumps(speech).encode(), {**trace}, _whole)
    audio = _body(buf)
    rows.append(("tts", (T() - t0) * 1000, _timing(buf), f"{len(audio)} bytes of WAV"))
    return rows


async def _ready(up: Up) -> None:
    c = await up.ready(180)
    await c.close()
    await up.serving(["asr", "chat", "tts"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=str(ROOT / "models" / "demo"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="casola-voice-"))
    top = f'models_dir = "{Path(args.models_dir).resolve()}"\n'
    toml = '[[workers]]\nmodels = ["echo"]\n[[workers]]\nmodels = ["asr"]\ncapacity = 2\nthreads = 2\n'
    toml += '[[workers]]\nmodels = ["chat"]\ncapacity = 2\nthreads = 2\n[[workers]]\nmodels = ["tts"]\ncapacity = 4\n'
    procs = Procs({**os.environ, "MALLOC_TOP_PAD_": "0"}, tmp)
    up = Up(procs, tmp / "up", toml, top)
    try:
        asyncio.run(_ready(up))
        http = Http(up.http, up.key())
        for r in range(args.rounds):
            for q in QUESTIONS:
                total = 0.0
                print(f"\nround {r + 1}: user says {q!r} (espeak-ng WAV)")
                for hop, ms, timing, out in loop(http, q):
                    total += ms
                    stages = ", ".join(f"{k}={v:.3f}" for k, v in timing.items())
                    print(
                        f"  {hop:4} {ms:8.1f} ms  platform {_platform(timing):6.3f} ms  [{stages}]\n       -> {out!r}"
                    )
                print(f"  end to end {total:.1f} ms")
    finally:
        up.stop()
        procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
