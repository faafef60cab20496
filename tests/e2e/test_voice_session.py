"""Realtime voice sessions end to end (issue 16): an unmodified `websockets` client streams an
espeak-ng question in 20 ms chunks at real-time pace to `GET /v1/realtime?workflow=NAME` and hears a
spoken answer; barge-in mid-answer cancels every step in flight (the workers saw CANCEL) and no late
audio follows; the session outlives a listen worker that dies; a drain closes it with 1012.

Everything is real and in this process, over loopback sockets: the ingress, the queue node, the
workflow engine, and worker runtimes serving the tiny model set (`listen`: an energy VAD and the
scripted Whisper, which hears any speech as "turn on the lights"; `chat-agent`: a weather tool call,
then three sentences; `chat-random`: random words until max_tokens; `tts`: espeak-ng).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from casola.auth import SCOPE_RUN
from casola.flow import Engine, WorkflowConfig
from casola.worker import WorkerConfig, WorkerRuntime
from tests.e2e.stack import Stack, run_uvloop
from tests.e2e.voice import AGENT, RAMBLER, espeak
from tests.require import need_module, need_program

websockets = need_module("websockets")
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

WORKFLOWS = {"agent": AGENT, "rambler": RAMBLER, "pair": {**AGENT, "max_concurrent": 2}}  # pair: one each
RATE = 22050  # espeak-ng's
CHUNK = RATE * 2 // 50  # 20 ms of PCM16 mono


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_program("espeak-ng")
    need_module("ctranslate2", "model-sets")
    from workers.tiny import build_tiny_set

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_set(root)
    return root


def speech(text: str) -> bytes:
    """espeak-ng's PCM16 mono at 22,050 Hz."""
    return espeak(text)


def silence(seconds: float) -> bytes:
    return bytes(int(RATE * seconds) * 2)


class Rig:
    """The stack, its workers (one runtime per role, so each one's CANCELs can be counted) and the engine."""

    def __init__(self, stack: Stack, runtimes: dict[str, WorkerRuntime], engine: Engine) -> None:
        self.stack, self.rt, self.engine = stack, runtimes, engine

    def url(self, workflow: str = "agent") -> str:
        return f"ws://127.0.0.1:{self.stack.http_port}/v1/realtime?workflow={workflow}"

    def headers(self, **params: str) -> dict[str, str]:
        out = {"Authorization": f"Bearer {self.stack.api_key}", "X-Casola-Param-rate": str(RATE)}
        return out | {f"X-Casola-Param-{k}": v for k, v in params.items()}


class Slowed:
    """A model whose every request starts `delay` seconds late (the TTS, slower than the LLM writes
    sentences: one is always being spoken when the user barges in)."""

    def __init__(self, model: Any, delay: float) -> None:
        self.model, self.delay, self.name = model, delay, model.name

    async def __call__(self, call: Any) -> None:
        await asyncio.sleep(self.delay)
        await self.model(call)


@asynccontextmanager
async def rig(tmp: Path, tiny: Path, listeners: int = 1, llms: int = 1, tts_delay: float = 0) -> AsyncIterator[Rig]:
    from workers.loader import build, resolve

    stack = await Stack(tmp).start()
    roles = {"tts": ["tts"], "misc": ["asr", "tools"]}
    roles |= {f"listen{i}": ["listen"] for i in range(listeners)}
    roles |= {"llm" if i == 0 else f"llm{i}": ["chat-agent", "chat-random"] for i in range(llms)}
    runtimes = {}
    for role, names in roles.items():
        models = [build(resolve(m, tiny)) for m in names]
        config = WorkerConfig(queue=[stack.queue_addr], models=names, capacity=8, threads=2, node_id=f"w-{role}")
        runtimes[role] = rt = WorkerRuntime(config, models, stack.worker_key)
        if role == "tts" and tts_delay:  # wrapped after: the runtime gives its thread pool to the real model
            (tts,) = models
            rt.models["tts"] = Slowed(tts, tts_delay)
    engine = Engine(
        {k: msgspec.convert(v, WorkflowConfig) for k, v in WORKFLOWS.items()}, stack.node.connect_member, "q"
    )
    try:
        for rt in runtimes.values():
            await rt.start()
            await rt.wait_registered()
        await engine.start()
        yield Rig(stack, runtimes, engine)
    finally:
        await engine.stop(drain_s=1)
        for rt in runtimes.values():
            await rt.stop()
        await stack.stop()


class Heard:
    """Everything the client received, in order: ("event", dict, t) or ("audio", bytes, t)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.log: list[tuple[str, Any, float]] = []
        self.task = asyncio.ensure_future(self._read())
        self.closed: ConnectionClosed | None = None

    async def _read(self) -> None:
        try:
            async for m in self.ws:
                kind = "audio" if isinstance(m, bytes) else "event"
                self.log.append((kind, m if kind == "audio" else json.loads(m), time.perf_counter()))
        except ConnectionClosed as exc:
            self.closed = exc

    def events(self, kind: str = "") -> list[dict[str, Any]]:
        return [m for k, m, _ in self.log if k == "event" and (not kind or m["type"] == kind)]

    async def until(self, kind: str, n: int = 1, timeout: float = 20, **fields: Any) -> dict[str, Any]:
        end = time.perf_counter() + timeout
        while True:
            got = [e for e in self.events(kind) if all(e.get(k) == v for k, v in fields.items())]
            if len(got) >= n:
                return got[n - 1]
            assert time.perf_counter() < end, f"no {kind} {fields or ''} within {timeout} s; got {self.types()}"
            assert not self.task.done(), f"the socket closed ({self.closed}); got {self.types()}"
            await asyncio.sleep(0.01)

    def types(self) -> list[str]:
        return [m["type"] for k, m, _ in self.log if k == "event"]

    def audio(self) -> bytes:
        return b"".join(m for k, m, _ in self.log if k == "audio")


async def stream(ws: ClientConnection, pcm: bytes) -> None:
    """Send `pcm` in 20 ms chunks at real-time pace, as a microphone would."""
    t0 = time.perf_counter()
    for n, i in enumerate(range(0, len(pcm), CHUNK), 1):
        await ws.send(pcm[i : i + CHUNK])
        await asyncio.sleep(max(0.0, t0 + n * 0.02 - time.perf_counter()))


def test_a_question_spoken_at_real_time_pace_is_answered_in_speech(tmp_path: Path, tiny: Path) -> None:
    async def main() -> Heard:
        async with rig(tmp_path, tiny) as r, connect(r.url(), additional_headers=r.headers()) as ws:
            heard = Heard(ws)
            await stream(ws, speech("What is the weather in Paris?") + silence(1.0))
            await heard.until("turn.timing")
            return heard

    heard = run_uvloop(main, 60)
    types = heard.types()
    assert types[:2] == ["session.started", "session.ready"]
    ready = heard.events("session.ready")[0]["session"]
    assert ready["input_audio"] == {"format": "pcm16", "rate": RATE, "channels": 1}
    assert ready["output_audio"] == {"format": "pcm16", "rate": 24000, "channels": 1}
    order = [t for t in types if t in ("speech_started", "speech_stopped", "transcript", "response.started",
                                       "response.done", "turn.timing")]  # fmt: skip
    assert order == ["speech_started", "speech_stopped", "transcript", "response.started", "response.done",
                     "turn.timing"]  # fmt: skip
    assert heard.events("transcript")[0]["text"] == "turn on the lights"
    said = [e["text"] for e in heard.events("response.text")]
    assert said == ["It is 18 degrees and sunny in Paris.", "Dr. Smith says 3.5 hours of sun remain, so enjoy it.",
                    "Have a lovely afternoon!"]  # fmt: skip
    done = heard.events("response.done")[0]
    assert done["status"] == "completed" and done["text"] == " ".join(said)
    audio = heard.audio()
    assert len(audio) % 2 == 0 and len(audio) / 48 == pytest.approx(done["audio_ms"], abs=1)  # 24 kHz PCM16
    samples = np.frombuffer(audio, "<i2")
    assert np.abs(samples).max() > 1000  # speech, not silence
    # Audio began before the answer was complete: the sentence text comes as its audio starts.
    first_audio = next(i for i, (k, _, _) in enumerate(heard.log) if k == "audio")
    last_text = max(i for i, (k, m, _) in enumerate(heard.log) if k == "event" and m["type"] == "response.text")
    assert first_audio < last_text
    t = heard.events("turn.timing")[0]
    parts = t["vad_tail_ms"] + t["listen_ms"] + t["llm_first_sentence_ms"] + t["tts_first_audio_ms"]
    assert parts <= t["voice_to_voice_ms"] <= parts + 5  # the parts are the path; the rest is the session's own
    assert 400 <= t["vad_tail_ms"] <= 700  # the listen model's silence_ms (500) and its windows
    assert 0 < t["asr_ms"] <= t["listen_ms"]
    assert 0 < t["platform_ms"] < t["voice_to_voice_ms"] and t["complete"] is True


def test_speech_while_the_agent_answers_cancels_every_step_and_no_late_audio_follows(
    tmp_path: Path, tiny: Path
) -> None:
    async def main() -> tuple[Heard, dict[str, int], dict[str, int]]:
        async with (
            rig(tmp_path, tiny, tts_delay=0.2) as r,
            connect(r.url("rambler"), additional_headers=r.headers()) as ws,
        ):
            heard = Heard(ws)
            await stream(ws, speech("Tell me a long story.") + silence(0.7))
            await heard.until("response.started")
            while not heard.audio():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            llm, tts = r.rt["llm"], r.rt["tts"]
            in_flight = {"llm": llm.active, "tts": tts.active}
            await stream(ws, speech("Stop, stop.") + silence(0.7))  # the user talks over the agent
            await heard.until("response.done", response="resp_1")
            await heard.until("response.started", 2)
            await ws.send(json.dumps({"type": "response.cancel"}))  # resp_2 answered the barge: enough
            await heard.until("response.done", response="resp_2")
            cancels = {"llm": llm.cancelled, "tts": tts.cancelled}
            await asyncio.sleep(0.2)
            return heard, in_flight, cancels

    heard, in_flight, cancels = run_uvloop(main, 90)
    assert in_flight["llm"] == 1 and in_flight["tts"] >= 1  # still generating and speaking when the user spoke
    assert cancels["llm"] >= 1 and cancels["tts"] >= 1  # CANCEL reached the LLM and the TTS in flight
    done = heard.events("response.done")[0]
    assert done["response"] == "resp_1" and done["status"] == "cancelled" and done["reason"] == "turn_detected"
    # Barge-in: the speech_started that interrupted comes right after the last audio of resp_1, and
    # nothing of resp_1 follows it (the session stops the response before it says so).
    log = heard.log
    barge = next(i for i, (k, m, _) in enumerate(log) if k == "event" and m["type"] == "speech_started"
                 and m["utterance"] == 2)  # fmt: skip
    second = next(i for i, (k, m, _) in enumerate(log) if k == "event" and m["type"] == "response.started"
                  and m["response"] == "resp_2")  # fmt: skip
    assert not [k for k, _, _ in log[barge:second] if k == "audio"]
    # The history keeps what was heard: resp_1's text is cut, and resp_2 answered the second utterance.
    full = " ".join(e["text"] for e in heard.events("response.text") if e["response"] == "resp_1")
    assert len(done["text"]) < len(full)
    assert heard.events("response.done")[1]["status"] in ("completed", "cancelled")


def test_a_typed_turn_is_answered_and_timed_without_speech(tmp_path: Path, tiny: Path) -> None:
    async def main() -> Heard:
        async with rig(tmp_path, tiny) as r, connect(r.url(), additional_headers=r.headers()) as ws:
            heard = Heard(ws)
            await heard.until("session.ready")
            await ws.send(json.dumps({"type": "text", "text": "What is the weather in Paris?"}))
            await heard.until("turn.timing")
            await ws.send(json.dumps({"type": "nonsense"}))
            await ws.send("not json")
            await heard.until("error", 2)
            await ws.send(json.dumps({"type": "text", "text": "And tomorrow?"}))
            await heard.until("turn.timing", 2)
            return heard

    heard = run_uvloop(main, 60)
    assert [e["status"] for e in heard.events("response.done")] == ["completed", "completed"]
    t = heard.events("turn.timing")[0]
    assert "voice_to_voice_ms" not in t and t["text_to_voice_ms"] > 0
    errors = [e["error"] for e in heard.events("error")]
    assert errors[0]["code"] == "invalid_request_error" and "nonsense" in errors[0]["message"]
    assert "JSON" in errors[1]["message"]


def test_malformed_input_is_refused_and_the_session_goes_on(tmp_path: Path, tiny: Path) -> None:
    async def main() -> Heard:
        async with rig(tmp_path, tiny) as r, connect(r.url(), additional_headers=r.headers()) as ws:
            heard = Heard(ws)
            await heard.until("session.ready")
            await ws.send(b"\x01")  # half a sample
            await ws.send(np.random.default_rng(7).bytes(333))  # noise, and an odd length
            await ws.send(json.dumps({"type": "session.update", "session": {"input_audio": {"rate": "fast"}}}))
            await ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": {"type": "psychic"}}}))
            await ws.send(json.dumps({"type": "truncate", "item": "item_404", "audio_ms": -5}))
            await heard.until("error", 3)
            await stream(ws, speech("What is the weather in Paris?") + silence(1.0))
            await heard.until("response.done")
            return heard

    heard = run_uvloop(main, 60)
    errors = [e["error"] for e in heard.events("error")]
    assert [e["param"] for e in errors] == ["input_audio.rate", "turn_detection.type", "item"]  # the fields sent
    assert errors[0]["message"].startswith("input_audio.rate must be a number")
    assert heard.events("transcript")[0]["text"] == "turn on the lights"
    assert heard.events("response.done")[0]["status"] == "completed"


def test_the_session_outlives_a_listen_worker_that_dies(tmp_path: Path, tiny: Path) -> None:
    async def main() -> Heard:
        async with rig(tmp_path, tiny, listeners=2) as r, connect(r.url(), additional_headers=r.headers()) as ws:
            heard = Heard(ws)
            await stream(ws, silence(0.3))
            busy = next(rt for role, rt in r.rt.items() if role.startswith("listen") and rt.active)
            await busy.stop()  # the worker holding the session's listen stream goes away
            await heard.until("error")
            await stream(ws, speech("What is the weather in Paris?") + silence(1.0))
            await heard.until("response.done")
            return heard

    heard = run_uvloop(main, 60)
    assert heard.events("error")[0]["error"]["code"] == "listen_interrupted"
    assert heard.events("transcript")[0]["text"] == "turn on the lights"
    assert heard.events("response.done")[0]["status"] == "completed"


def test_a_client_that_hangs_up_mid_answer_cancels_every_step_in_flight(tmp_path: Path, tiny: Path) -> None:
    async def main() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        async with rig(tmp_path, tiny, tts_delay=0.2) as r:
            llm, tts, listen = r.rt["llm"], r.rt["tts"], r.rt["listen0"]
            async with connect(r.url("rambler"), additional_headers=r.headers()) as ws:
                heard = Heard(ws)
                await stream(ws, speech("Tell me a long story.") + silence(0.7))
                while not heard.audio():
                    await asyncio.sleep(0.01)
                in_flight = {"llm": llm.active, "tts": tts.active, "listen": listen.active}
            # The socket is gone (closed, mid-answer): every stream the session held is cancelled.
            end = time.perf_counter() + 5
            while (llm.active or tts.active or listen.active) and time.perf_counter() < end:
                await asyncio.sleep(0.01)
            left = {"llm": llm.active, "tts": tts.active, "listen": listen.active}
            return in_flight, {"llm": llm.cancelled, "tts": tts.cancelled, "listen": listen.cancelled}, left

    in_flight, cancels, left = run_uvloop(main, 60)
    assert in_flight["llm"] == 1 and in_flight["tts"] >= 1 and in_flight["listen"] == 1
    assert cancels["llm"] >= 1 and cancels["tts"] >= 1 and cancels["listen"] >= 1
    assert left == {"llm": 0, "tts": 0, "listen": 0}


def test_an_llm_worker_that_dies_mid_answer_fails_that_response_and_the_next_turn_is_answered(
    tmp_path: Path, tiny: Path
) -> None:
    async def main() -> Heard:
        async with rig(tmp_path, tiny, llms=2) as r, connect(r.url("rambler"), additional_headers=r.headers()) as ws:
            heard = Heard(ws)
            await stream(ws, speech("Tell me a long story.") + silence(0.7))
            while not heard.audio():
                await asyncio.sleep(0.01)
            busy = next(rt for role, rt in r.rt.items() if role.startswith("llm") and rt.active)
            await busy.stop()  # the worker generating this answer goes away
            await heard.until("response.done", response="resp_1")
            await ws.send(json.dumps({"type": "text", "text": "Are you still there?"}))
            await heard.until("response.started", 2)
            await heard.until("response.text", response="resp_2")
            return heard

    heard = run_uvloop(main, 60)
    first = heard.events("response.done")[0]
    assert first["status"] == "failed" and first["error"]["retryable"] is True
    assert heard.events("response.started")[1]["response"] == "resp_2"  # the socket stayed open


def test_one_tenant_may_not_hold_every_slot_of_a_workflow(tmp_path: Path, tiny: Path) -> None:
    async def main() -> tuple[Heard, Heard, Heard]:
        async with rig(tmp_path, tiny) as r:
            other = {"Authorization": f"Bearer {r.stack.keys.ensure_key('other-key', 'other', [SCOPE_RUN], 'tests')}"}
            async with connect(r.url("pair"), additional_headers=r.headers()) as first:
                mine = Heard(first)
                await mine.until("session.ready")
                async with connect(r.url("pair"), additional_headers=r.headers()) as second:
                    refused = Heard(second)
                    await asyncio.wait_for(refused.task, 5)
                # The other tenant still gets the workflow's second slot, and is answered.
                async with connect(r.url("pair"), additional_headers=r.headers() | other) as third:
                    theirs = Heard(third)
                    await theirs.until("session.ready")
                    await third.send(json.dumps({"type": "text", "text": "What is the weather in Paris?"}))
                    await theirs.until("response.done")
            return mine, refused, theirs

    mine, refused, theirs = run_uvloop(main, 60)
    err = refused.events("error")[-1]["error"]
    assert err["code"] == "overloaded" and err["retryable"] is True and err["retry_after_ms"] == 2000
    assert refused.closed is not None and refused.closed.rcvd is not None and refused.closed.rcvd.code == 1013
    assert "session.ready" not in refused.types()
    assert theirs.events("response.done")[0]["status"] == "completed"
    assert "error" not in mine.types() and mine.closed is None  # the first session was never touched


def test_a_drain_ends_the_session_with_a_close_code_that_says_reconnect(tmp_path: Path, tiny: Path) -> None:
    async def main() -> Heard:
        async with rig(tmp_path, tiny) as r, connect(r.url(), additional_headers=r.headers()) as ws:
            heard = Heard(ws)
            await heard.until("session.ready")
            await r.engine.stop(drain_s=2)
            await asyncio.wait_for(heard.task, 5)
            return heard

    heard = run_uvloop(main, 60)
    assert heard.closed is not None and heard.closed.rcvd is not None and heard.closed.rcvd.code == 1012
    err = heard.events("error")[-1]["error"]
    assert err["code"] == "shutting_down" and err["retryable"] is True


def test_turns_are_counted_in_metrics(tmp_path: Path, tiny: Path) -> None:
    async def main() -> str:
        async with rig(tmp_path, tiny) as r, connect(r.url(), additional_headers=r.headers()) as ws:
            r.stack.ingress.metrics.realtime = r.engine.turn_stats
            heard = Heard(ws)
            await stream(ws, speech("What is the weather in Paris?") + silence(1.0))
            await heard.until("turn.timing")
            return r.stack.ingress.metrics.render().decode()

    text = run_uvloop(main, 60)
    assert 'casola_realtime_turns_total{status="completed"} 1' in text
    for part in ("voice_to_voice", "vad_tail", "asr", "llm_first_sentence", "tts_first_audio", "platform"):
        assert f'casola_realtime_turn_seconds_count{{part="{part}"}} 1' in text
