"""Realtime voice sessions: voice to voice, and barge-in (issue 16, deliverable 10).

A websockets client plays a microphone: espeak-ng speech of the question in 20 ms PCM16 chunks at
real-time pace to `GET /v1/realtime?workflow=voice-agent` on a `casola up` this bench starts (the
same workflow and workers as bench/workflow.py, and a worker of its own for `listen`), then silence
until the answer's audio comes. Per turn (a fresh session each, so every turn answers the same
question with no history):

- voice to voice at the client: the end of the question's speech (its last sample above -40 dBFS,
  on the pacing clock) -> the first binary message of the answer received;
- the session's own split (its `turn.timing` event): VAD tail, listen (ASR) and Whisper's share,
  LLM to the first sentence, TTS to the first audio, and the platform's share; and the ingress's
  and WebSocket's share: the client's voice to voice measured from where the VAD put the end of
  speech (`speech_stopped.audio_ms` on the pacing clock), less the session's;
- the baseline, in the same run, alternating with it: a client that calls casola's HTTP endpoints
  itself, as bench/workflow.py's mode (b) does (upload the WAV to ASR, chat with the tool loop
  streamed, TTS of the answer), after waiting the VAD tail the paired session turn waited (a
  client-side VAD must wait as long).

Barge-in (`--barge`, default 20 tries on the rambling workflow that answers at length): as the
first audio of the answer arrives the client starts speaking again; reported: from the
`speech_started` event the interruption causes to the last audio frame of the interrupted response
received (<= 0: none came after it), the audio frames after it, and the interruption's onset ->
speech_started (the VAD's min_speech_ms).

A flood (`--flood K`, default 0): afterwards the same turns again, while another tenant (its own key)
opens K sessions on the same workflow, more than its share of the workflow's slots
(`realtime.max_sessions_per_tenant`), and has every one it gets ask the question again and again;
reported: the first tenant's voice to voice and platform share alone and under the flood, and how
many of the flood's sessions were refused and how many of its turns were answered.

Usage:
    python bench/realtime.py                   # tiny models (built now)
    python bench/realtime.py --set demo        # models/demo (`casola models prepare-demo`)
    python bench/realtime.py --turns 20 --barge 20 --json out.json
    python bench/realtime.py --barge 0 --flood 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# isort: off
from workflow import SETS, ModelSet, TracedUp, _espeak, _models, _ready, config_toml, mode_b  # re-runs under .venv

import numpy as np
from floor import Procs
from handlers import Http
from upstack import pct
from websockets.asyncio.client import ClientConnection, connect

# isort: on

QUESTION = "What's the weather in Paris?"
INTERRUPTION = "Wait, stop. Tell me about London instead."
T = time.perf_counter
SILENCE_MS = 500  # the listen stream's (and the baseline client's own VAD) tail
# An answer that goes on: the tiny set's random-word model, or the demo's agent told to ramble.
RAMBLERS = {"tiny": ("chat-random", 1500), "demo": ("agent", 400)}
RAMBLE = """
[workflows.rambler]
steps = [
  { name = "think", kind = "llm", model = "@LLM@", params = { max_tokens = @MAX@ }, system = "Answer at length." },
  { name = "split", kind = "sentences" },
  { name = "speak", kind = "model", model = "@TTS@" },
]
[workflows.rambler.realtime]
params = { silence_ms = 500 }
"""


def config(s: ModelSet, tools_dir_exists: bool, rambler: tuple[str, int]) -> str:
    # 8 runs or sessions at once (as examples/voice-agent.toml), so one tenant's share is 4; every
    # session holds a `listen` slot while it lasts, so `listen` has a worker with 8 of its own (on a
    # worker shared with the LLM, sessions would hold the LLM's slots too).
    toml = config_toml(s, tools_dir_exists)
    toml = toml.replace("[workflows.voice-agent]\n", "[workflows.voice-agent]\nmax_concurrent = 8\n", 1)
    toml = '[[workers]]\nmodels = ["listen"]\ncapacity = 8\nthreads = 2\n' + toml
    toml += f"\n[workflows.voice-agent.realtime]\nparams = {{ silence_ms = {SILENCE_MS} }}\n"
    llm, most = rambler
    toml = toml.replace(f'"{s.llm}"]\ncapacity', f'"{s.llm}", "{llm}"]\ncapacity', 1) if llm != s.llm else toml
    return toml + RAMBLE.replace("@LLM@", llm).replace("@MAX@", str(most)).replace("@TTS@", s.tts)


def pcm_of(wav: bytes) -> tuple[int, bytes]:
    at = wav.index(b"data")
    return int.from_bytes(wav[24:28], "little"), wav[at + 8 :]


def speech_end_s(pcm: bytes, rate: int) -> float:
    """Where the speech ends: the last 10 ms window above -40 dBFS."""
    x = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    win = rate // 100
    rms = np.sqrt(np.mean(x[: len(x) // win * win].reshape(-1, win) ** 2, axis=1))
    loud = np.nonzero(rms > 0.01)[0]
    return float((loud[-1] + 1) * win / rate) if len(loud) else 0.0


class Mic:
    """Sends audio at real-time pace, then silence until told to stop (a microphone never ends)."""

    def __init__(self, ws: ClientConnection, rate: int) -> None:
        self.ws, self.rate, self.chunk = ws, rate, rate * 2 // 50
        self.queue: list[bytes] = []
        self.t0 = 0.0
        self.sent = 0  # chunks

    def say(self, pcm: bytes) -> float:
        """Queue `pcm`; returns the pacing-clock time its first sample goes out."""
        start = self.t0 + self.sent * 0.02 + len(self.queue) * 0.02
        self.queue += [pcm[i : i + self.chunk].ljust(self.chunk, b"\0") for i in range(0, len(pcm), self.chunk)]
        return start

    async def run(self) -> None:
        self.t0 = T()
        quiet = bytes(self.chunk)
        while True:
            await self.ws.send(self.queue.pop(0) if self.queue else quiet)
            self.sent += 1
            await asyncio.sleep(max(0.0, self.t0 + self.sent * 0.02 - T()))


@asynccontextmanager
async def session(url: str, key: str, rate: int) -> AsyncIterator[tuple[ClientConnection, Mic]]:
    """A session whose microphone is already sending (silence until told what to say)."""
    headers = {"Authorization": f"Bearer {key}", "X-Casola-Param-rate": str(rate)}
    async with connect(url, additional_headers=headers) as ws:
        mic = Mic(ws, rate)
        sending = asyncio.ensure_future(mic.run())
        try:
            await asyncio.sleep(0.2)
            yield ws, mic
        finally:
            sending.cancel()


async def one_turn(url: str, key: str, rate: int, pcm: bytes, end_s: float) -> dict[str, Any]:
    async with session(url, key, rate) as (ws, mic):
        start = mic.say(pcm)
        first_audio, timing, done, stopped, heard = 0.0, None, None, None, ""
        async for m in ws:
            if isinstance(m, bytes):
                first_audio = first_audio or T()
                continue
            ev = json.loads(m)
            if ev["type"] == "error":
                raise RuntimeError(f"session error: {ev}")
            if ev["type"] == "speech_stopped":
                stopped = ev
            elif ev["type"] == "transcript":
                heard = ev["text"]
            elif ev["type"] == "response.done":
                done = ev
            elif ev["type"] == "turn.timing":
                timing = ev
                break
    assert done is not None and done["status"] == "completed", done
    assert stopped is not None and timing is not None
    client = (first_audio - (start + end_s)) * 1000
    by_vad = (first_audio - (mic.t0 + stopped["audio_ms"] / 1000)) * 1000  # the session's end of speech
    ingress = by_vad - timing["voice_to_voice_ms"]
    return {"client_v2v": client, "ingress": ingress, **timing, "heard": heard, "text": done["text"]}


async def one_barge(url: str, key: str, rate: int, pcm: bytes, cut: bytes) -> dict[str, Any]:
    async with session(url, key, rate) as (ws, mic):
        mic.say(pcm)
        onset = started = done_at = 0.0
        audio_after, last_audio, status = 0, 0.0, ""
        async for m in ws:
            now = T()
            if isinstance(m, bytes):
                if not onset:
                    onset = mic.say(cut)  # the user talks over the first audio
                elif started and not done_at:
                    audio_after += 1
                if not done_at:
                    last_audio = now
                continue
            ev = json.loads(m)
            if ev["type"] == "response.done" and ev["response"] == "resp_1":
                done_at, status = now, f"{ev['status']}/{ev.get('reason', '')}"
            elif ev["type"] == "speech_started" and onset and not started:
                started = now
            if done_at and started:
                break
    return {"after_ms": (last_audio - started) * 1000, "frames_after": audio_after, "status": status,
            "onset_to_event_ms": (started - onset) * 1000, "event_to_done_ms": (done_at - started) * 1000}  # fmt: skip


class Flood:
    """Another tenant's sessions, each asking the question over and over for as long as it lasts."""

    def __init__(self, url: str, key: str, rate: int, pcm: bytes, sessions: int) -> None:
        self.url, self.key, self.rate, self.pcm, self.n = url, key, rate, pcm, sessions
        self.refused = self.answered = 0
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._talk()) for _ in range(self.n)]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _talk(self) -> None:
        async with session(self.url, self.key, self.rate) as (ws, mic):
            mic.say(self.pcm)
            async for m in ws:
                if isinstance(m, bytes):
                    continue
                ev = json.loads(m)
                if ev["type"] == "error" and ev["error"]["code"] == "overloaded":
                    self.refused += 1
                    return
                if ev["type"] == "turn.timing":
                    self.answered += 1
                    mic.say(self.pcm)  # and again


async def flooded_turns(url: str, key: str, rate: int, pcm: bytes, end_s: float, turns: int,
                        flood: Flood) -> list[dict[str, Any]]:  # fmt: skip
    flood.start()
    try:
        await asyncio.sleep(3)  # the flood's sessions are open and talking
        return [await one_turn(url, key, rate, pcm, end_s) for _ in range(turns)]
    finally:
        await flood.stop()


def second_key(up: TracedUp, tenant: str) -> str:
    cmd = [sys.executable, "-m", "casola", "keys", "create", "--tenant", tenant, "--state-dir", str(up.state)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def baseline(http: Http, s: ModelSet, wav: bytes, tail_ms: float) -> dict[str, Any]:
    time.sleep(tail_ms / 1000)  # the client's own VAD waits for the same silence
    got = mode_b(http, s, wav)
    return {"client_v2v": tail_ms + got["first_audio"], "text": got["answer"], "hops": got["hops"]}


def stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"p50 {pct(xs, 50):8.1f}  p90 {pct(xs, 90):8.1f}  min {min(xs):8.1f}  max {max(xs):8.1f}"


def report(
    turns: list[dict[str, Any]], base: list[dict[str, Any]], barges: list[dict[str, Any]], head: str
) -> dict[str, Any]:
    print(head)
    rows = {
        "voice to voice, client (session)": [t["client_v2v"] for t in turns],
        "voice to voice, client (HTTP-chained baseline)": [b["client_v2v"] for b in base],
        "  session: voice_to_voice_ms": [t["voice_to_voice_ms"] for t in turns],
        "  vad_tail_ms": [t["vad_tail_ms"] for t in turns],
        "  listen_ms": [t["listen_ms"] for t in turns],
        "    asr_ms (Whisper)": [t["asr_ms"] for t in turns],
        "  llm_first_sentence_ms": [t["llm_first_sentence_ms"] for t in turns],
        "  tts_first_audio_ms": [t["tts_first_audio_ms"] for t in turns],
        "  platform_ms (session's share)": [t["platform_ms"] for t in turns],
        "  ingress + WebSocket (client by VAD end - session)": [t["ingress"] for t in turns],
    }
    if barges:
        rows |= {
            "barge-in: speech_started -> last audio frame": [b["after_ms"] for b in barges],
            "barge-in: audio frames after speech_started": [float(b["frames_after"]) for b in barges],
            "barge-in: speech_started -> response.done": [b["event_to_done_ms"] for b in barges],
            "barge-in: onset -> speech_started (VAD)": [b["onset_to_event_ms"] for b in barges],
        }
    for name, xs in rows.items():
        print(f"{name:48s} {stats(xs)}")
    if base and turns:
        ratio = pct(rows[next(iter(rows))], 50) / pct([b["client_v2v"] for b in base], 50)  # type: ignore[operator]
        print(f"session / baseline, p50: {ratio:.2f}")
    parts = sorted({k for t in turns for k in t["platform_parts_ms"]})
    for k in parts:
        print(f"{'    platform: ' + k:48s} {stats([t['platform_parts_ms'].get(k, 0.0) for t in turns])}")
    if barges:
        print("barge-in outcomes:", sorted({b["status"] for b in barges}))
    return {name: {"p50": pct(xs, 50), "p90": pct(xs, 90)} for name, xs in rows.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=tuple(SETS), default="tiny")
    ap.add_argument("--models-dir", help="default: a fresh tiny set, or models/demo")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--barge", type=int, default=20, help="barge-in tries (0: none)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--flood", type=int, default=0, help="another tenant's sessions, asking all along (0: none)")
    ap.add_argument("--json", help="write the summary and every turn here")
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        print("bench/realtime.py: espeak-ng is not installed (the question's speech)", file=sys.stderr)
        return 2
    s = SETS[args.set]
    tmp = Path(tempfile.mkdtemp(prefix="casola-bench-realtime-"))
    models_dir = _models(args, tmp)
    for need in (s.llm, "listen"):
        if not (models_dir / need).exists():
            print(
                f"bench/realtime.py: {models_dir / need} is missing: run `casola models prepare-demo`", file=sys.stderr
            )
            return 2
    procs = Procs({**os.environ, "MALLOC_TOP_PAD_": "0"}, tmp)
    up = TracedUp(
        procs,
        tmp / "up",
        config(s, (models_dir / s.tools).exists(), RAMBLERS[args.set]),
        f'models_dir = "{models_dir}"\n',
    )
    turns: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    barges: list[dict[str, Any]] = []
    flooded: list[dict[str, Any]] = []
    flood: Flood | None = None
    try:
        models = [s.asr, s.llm, s.tts, s.tools, "listen", RAMBLERS[args.set][0], "voice-agent", "rambler"]
        asyncio.run(_ready(up, models))
        key, wav = up.key(), _espeak(QUESTION)
        http = Http(up.http, key)
        rate, pcm = pcm_of(wav)
        end_s = speech_end_s(pcm, rate)
        url = f"ws://127.0.0.1:{up.http}/v1/realtime?workflow="
        for i in range(args.warmup + args.turns):
            t = asyncio.run(one_turn(url + "voice-agent", key, rate, pcm, end_s))
            b = baseline(http, s, wav, t["vad_tail_ms"])
            if i >= args.warmup:
                turns.append(t)
                base.append(b)
        _, cut = pcm_of(_espeak(INTERRUPTION))
        for _ in range(args.barge):
            barges.append(asyncio.run(one_barge(url + "rambler", key, rate, pcm, cut)))
        if args.flood:
            flood = Flood(url + "voice-agent", second_key(up, "flooder"), rate, pcm, args.flood)
            flooded = asyncio.run(flooded_turns(url + "voice-agent", key, rate, pcm, end_s, args.turns, flood))
    finally:
        up.stop()
        procs.stop()
    head = (f"realtime voice turns ({QUESTION!r}), set {args.set} ({models_dir}), {len(turns)} turns after "
            f"{args.warmup} warm-up, {len(barges)} barge-ins, ms")  # fmt: skip
    out = report(turns, base, barges, head)
    if base:
        for hop in base[0]["hops"]:
            print(f"{'  baseline: ' + hop + ' (request, ms)':48s} {stats([b['hops'][hop] for b in base])}")
    if flood is not None:
        print(f"flood: tenant 'flooder' opened {flood.n} sessions: {flood.refused} refused (its share), "
              f"{flood.answered} of its turns answered meanwhile")  # fmt: skip
        for name, key_ in (("voice to voice, client", "client_v2v"), ("platform_ms", "platform_ms")):
            alone, under = [t[key_] for t in turns], [t[key_] for t in flooded]
            print(f"{name + ' alone':48s} {stats(alone)}")
            print(f"{name + ' under the flood':48s} {stats(under)}")
    print("heard (session):", turns[0]["heard"] if turns else "-")
    print("answer (session):", turns[0]["text"] if turns else "-")
    print("answer (baseline):", base[0]["text"] if base else "-")
    if args.json:
        doc = {"argv": sys.argv, "set": args.set, "summary": out, "turns": turns, "baseline": base, "barges": barges,
               "flooded": flooded}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
