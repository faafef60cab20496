"""The browser example (examples/realtime/) holds a voice session in a real Chromium: headless, its
microphone a WAV file (Chromium's fake capture device), its speaker a fake sink. The page's own files
are served from a second local server (another origin, as a developer serves them), with
`?api=&key=&autostart=1`: it mints a session token, opens the WebSocket, sends its AudioContext's rate,
streams the microphone through its AudioWorklet and plays the answers. The stack is the voice
session's, in this process: queue node, ingress, a worker with the tiny set's listen / asr /
chat-agent / tts / tools, and the engine serving the workflow `agent`.

The microphone asks twice: the second question comes while the first answer (~8 s of audio) is still
playing, so the page must stop its playback there (barge-in) and then play the second answer.

A harness page (the test's, same origin) frames the example and posts its `window.casolaRealtime`
back once both turns are done, so the example's code is what runs, unmodified."""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import wave
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from casola.flow import Engine, WorkflowConfig
from casola.worker import WorkerConfig, WorkerRuntime
from tests.e2e.chromium import PageSite, chromium_args
from tests.e2e.stack import ROOT, Stack, run_uvloop
from tests.e2e.voice import AGENT
from tests.require import need_module, need_program
from workers.loader import build, resolve

EXAMPLE = ROOT / "examples" / "realtime"
EXAMPLE_FILES = {"index.html": "text/html", "app.js": "text/javascript"}
QUESTIONS = ("What is the weather like in Paris today?", "And will it rain in London tomorrow?")
SCRIPT = "turn on the lights"  # what the tiny set's asr hears in any audio
MODELS = ["listen", "asr", "chat-agent", "tts", "tools"]
WORKFLOW = AGENT

# Frames the example (same origin: its window is readable) and reports its status when the second
# turn is done and its answer has been acknowledged as played, when something failed, or at the end.
HARNESS = """<!doctype html><html><body>
<iframe id="f" src="/index.html?%(query)s" allow="microphone; autoplay" width="800" height="600"></iframe>
<script>
const t0 = Date.now();
const timer = setInterval(async () => {
  const s = document.getElementById("f").contentWindow.casolaRealtime;
  const second = s && s.responses[1];
  const done = second && s.timing.length >= 2 && s.acked[second.id] > 0;
  if (!(done || (s && s.errors.length) || Date.now() - t0 > %(wait_ms)d)) return;
  clearInterval(timer);
  await fetch("/report", {method: "POST", body: JSON.stringify(s || {missing: true})});
}, 200);
</script></body></html>"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_module("ctranslate2", "model-sets")
    need_module("onnxruntime")  # the tiny listen model's energy VAD
    from workers.tiny import build_tiny_set

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_set(root)
    return root


def _microphone_wav(path: Path) -> Path:
    """espeak-ng's questions as 16-bit mono PCM WAV: 1 s of silence first (the page starts sending a
    moment after the device opens), 3 s between them (the first answer starts in that gap and lasts
    longer), 2 s at the end (the VAD's end of speech). Chromium plays it once (`%noloop`), then zeros."""
    espeak = need_program("espeak-ng")
    parts: list[Any] = []
    rate = 0
    for question in QUESTIONS:
        out = subprocess.run([espeak, "-v", "en-us", "-w", "/dev/stdout", question], check=True, capture_output=True)
        with wave.open(io.BytesIO(out.stdout)) as w:
            rate = w.getframerate()
            assert (w.getsampwidth(), w.getnchannels()) == (2, 1)
            parts.append(np.frombuffer(w.readframes(w.getnframes()), "<i2"))
    pcm = np.concatenate(
        [np.zeros(rate, "<i2"), parts[0], np.zeros(3 * rate, "<i2"), parts[1], np.zeros(2 * rate, "<i2")]
    )
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _microphone_flags(wav: Path) -> list[str]:
    return [
        "--enable-logging=stderr",  # the pages' console messages, for a failure's message
        "--use-fake-ui-for-media-stream",  # getUserMedia granted without a prompt
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",  # played once, then silence (it loops by default)
        "--autoplay-policy=no-user-gesture-required",  # the AudioContext runs with no click
    ]


def test_the_browser_example_talks_and_is_interrupted(tmp_path: Path, tiny: Path) -> None:
    binary = need_program("chromium")
    wav = _microphone_wav(tmp_path / "microphone.wav")

    async def main() -> dict[str, Any]:
        site = PageSite()
        # the example's own files, as they are on disk
        site.pages |= {f"/{f}": (kind, (EXAMPLE / f).read_bytes()) for f, kind in EXAMPLE_FILES.items()}
        origin = await site.start()
        stack = await Stack(tmp_path / "state", ingress={"cors_origins": [origin]}).start()
        config = WorkerConfig(queue=[stack.queue_addr], models=MODELS, capacity=8, threads=2)
        worker = WorkerRuntime(config, [build(resolve(m, tiny)) for m in MODELS], stack.worker_key)
        engine = Engine({"agent": msgspec.convert(WORKFLOW, WorkflowConfig)}, stack.node.connect_member, "q")
        proc = None
        log = (tmp_path / "chromium.log").open("wb")
        try:
            await worker.start()
            await worker.wait_registered()
            await engine.start()
            api = f"http://127.0.0.1:{stack.http_port}"  # another port: another origin
            query = f"api={api}&key={stack.api_key}&workflow=agent&autostart=1"
            site.pages["/"] = ("text/html", (HARNESS % {"query": query, "wait_ms": 35000}).encode())
            proc = await asyncio.create_subprocess_exec(
                *chromium_args(binary, tmp_path / "profile", origin + "/", *_microphone_flags(wav)),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            return await asyncio.wait_for(site.report, 45)
        finally:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            log.close()
            await engine.stop()
            await worker.stop()
            await stack.stop()
            site.close()

    got = run_uvloop(main, timeout=90)
    lines = (tmp_path / "chromium.log").read_text(errors="replace").splitlines()
    console = [line for line in lines if "CONSOLE" in line]
    brief = {**{k: v for k, v in got.items() if k != "session"}, "console": console[-10:]}
    assert not got.get("errors") and got.get("connected"), brief
    assert got["inputRate"] >= 8000 and got["audioSent"] > 0, brief
    events = got["events"]
    assert events[:3] == ["session.started", "session.ready", "session.updated"], brief
    assert got["session"]["input_audio"]["rate"] == got["inputRate"], brief  # the page's session.update took
    # The server heard the fake microphone: speech, its end, the transcript, then an answer; twice.
    turn = ["speech_started", "speech_stopped", "transcript", "response.started"]
    assert [e for e in events if e in turn] == turn + turn, brief
    assert [(t["role"], t["text"]) for t in got["transcripts"]][::2] == [("user", SCRIPT)] * 2, brief
    first, second = got["responses"][:2]
    for resp, line in ((first, got["transcripts"][1]), (second, got["transcripts"][3])):
        assert resp["status"] == "completed" and resp["audio_ms"] > 2000, brief
        assert line["role"] == "assistant" and line["id"] == resp["id"] and "Paris" in line["text"], brief
    assert got["audioBytes"] >= (first["audio_ms"] + second["audio_ms"]) * 48 * 0.9, brief  # PCM16 24 kHz: 48 B/ms
    assert [t["response"] for t in got["timing"]] == [first["id"], second["id"]], brief
    assert all(t["voice_to_voice_ms"] > 0 and t["platform_ms"] >= 0 for t in got["timing"]), brief
    # The second question cut the first answer's playback, partway; its playout was acknowledged there.
    (cut,) = got["bargeIns"]
    assert cut["response"] == first["id"] and 300 < cut["played_ms"] < first["audio_ms"] - 300, brief
    assert abs(got["acked"][first["id"]] - cut["played_ms"]) < 50, brief
    assert (
        got["transcripts"][1].get("interrupted") == cut["played_ms"] and "interrupted" not in got["transcripts"][3]
    ), brief
    assert got["acked"][second["id"]] > 0, brief  # the second answer plays
