"""OpenAI Realtime's events on `GET /openai/v1/realtime?model=NAME` (casola.realtime.openai): a client
written for OpenAI's API, with only the URL changed, holds a spoken conversation with a workflow.

The client is a script on the `websockets` library speaking OpenAI's beta events ("OpenAI-Beta:
realtime=v1"): JSON text only, audio base64 PCM16 mono 24 kHz both ways. Everything behind it is real
and in this process, over loopback (ingress, queue node, workflow engine, one worker runtime serving
the tiny model set: `listen`'s energy VAD and a scripted Whisper that hears any speech as "turn on
the lights", `chat-agent`'s weather tool call then three sentences, `chat-random`'s endless words,
espeak-ng as TTS). One stack serves the whole module, on one event loop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from casola.flow import Engine, WorkflowConfig
from casola.worker import WorkerConfig, WorkerRuntime
from tests.e2e.stack import Stack
from tests.e2e.voice import AGENT, RAMBLER, espeak
from tests.require import need_module, need_program

websockets = need_module("websockets")
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

WORKFLOWS = {"agent": AGENT, "rambler": RAMBLER}
MODELS = ["listen", "asr", "chat-agent", "chat-random", "tts", "tools"]
ALIAS = "gpt-4o-realtime-preview"  # [ingress] openai_aliases maps it to the workflow
RATE = 24000  # OpenAI's pcm16
CHUNK = RATE * 2 // 50  # 20 ms of PCM16 mono
ANSWER = ("It is 18 degrees and sunny in Paris. Dr. Smith says 3.5 hours of sun remain, so enjoy it. "
          "Have a lovely afternoon!")  # fmt: skip


class Rig:
    """The module's stack, its worker runtime and engine, and the one event loop they run on."""

    def __init__(self, runner: asyncio.Runner, stack: Stack, rt: WorkerRuntime, engine: Engine) -> None:
        self.runner, self.stack, self.rt, self.engine = runner, stack, rt, engine

    def run(self, main: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
        return self.runner.run(asyncio.wait_for(main(), timeout))

    async def stop(self) -> None:
        await self.engine.stop(drain_s=1)
        await self.rt.stop()
        await self.stack.stop()


async def _start(runner: asyncio.Runner, state: Path, tiny: Path) -> Rig:
    from workers.loader import build, resolve

    stack = await Stack(state, ingress={"openai_aliases": {ALIAS: "agent"}}).start()
    config = WorkerConfig(queue=[stack.queue_addr], models=MODELS, capacity=16, threads=2)
    rt = WorkerRuntime(config, [build(resolve(m, tiny)) for m in MODELS], stack.worker_key)
    workflows = {k: msgspec.convert(v, WorkflowConfig) for k, v in WORKFLOWS.items()}
    engine = Engine(workflows, stack.node.connect_member, "q")
    await rt.start()
    await rt.wait_registered()
    await engine.start()
    return Rig(runner, stack, rt, engine)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    need_program("espeak-ng")
    need_module("ctranslate2", "model-sets")
    uvloop = need_module("uvloop")
    from workers.tiny import build_tiny_set

    tiny = tmp_path_factory.mktemp("tiny")
    build_tiny_set(tiny)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        r = runner.run(asyncio.wait_for(_start(runner, tmp_path_factory.mktemp("state"), tiny), 60))
        try:
            yield r
        finally:
            runner.run(asyncio.wait_for(r.stop(), 30))


@functools.cache
def speech(text: str) -> bytes:
    """espeak-ng saying `text`, as OpenAI's pcm16: PCM16 mono at 24 kHz."""
    return espeak(text, RATE)


def silence(seconds: float) -> bytes:
    return bytes(int(RATE * seconds) * 2)


class Client:
    """An OpenAI Realtime client: every server event kept in order, each client event given an event_id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.binary = 0  # binary messages (OpenAI's protocol has none)
        self.closed: ConnectionClosed | None = None
        self._ids = itertools.count(1)
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for m in self.ws:
                if isinstance(m, bytes):
                    self.binary += 1
                else:
                    self.events.append(json.loads(m))
        except ConnectionClosed as exc:
            self.closed = exc

    async def send(self, kind: str, **fields: Any) -> str:
        event_id = f"evt_client_{next(self._ids)}"
        await self.ws.send(json.dumps({"type": kind, "event_id": event_id, **fields}))
        return event_id

    def of(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind and all(e.get(k) == v for k, v in fields.items())]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def until(self, kind: str, n: int = 1, timeout: float = 15, **fields: Any) -> dict[str, Any]:
        end = time.perf_counter() + timeout
        while len(got := self.of(kind, **fields)) < n:
            assert time.perf_counter() < end, f"no {kind} {fields or ''} within {timeout} s; got {self.types()}"
            assert not self.task.done(), f"the socket closed ({self.closed}); got {self.types()}"
            await asyncio.sleep(0.01)
        return got[n - 1]

    async def stream(self, pcm: bytes, paced: bool = True) -> None:
        """`pcm` in 20 ms appends; `paced`: at real-time pace, as a microphone sends it."""
        t0 = time.perf_counter()
        for n, i in enumerate(range(0, len(pcm), CHUNK), 1):
            await self.send("input_audio_buffer.append", audio=base64.b64encode(pcm[i : i + CHUNK]).decode())
            if paced:
                await asyncio.sleep(max(0.0, t0 + n * 0.02 - time.perf_counter()))

    async def say(self, text: str) -> None:
        """A typed user turn, then response.create (OpenAI's way: the item alone does not answer)."""
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        await self.send("conversation.item.create", item=item)
        await self.send("response.create")


@asynccontextmanager
async def session(rig: Rig, model: str = "agent") -> AsyncIterator[Client]:
    url = f"ws://127.0.0.1:{rig.stack.http_port}/openai/v1/realtime?model={model}"
    headers = {"Authorization": f"Bearer {rig.stack.api_key}", "OpenAI-Beta": "realtime=v1"}
    async with connect(url, additional_headers=headers) as ws:
        client = Client(ws)
        await client.until("session.created")
        yield client


def test_session_created_comes_first_and_session_update_is_reflected(rig: Rig) -> None:
    update: dict[str, Any] = {
        "instructions": "Be brief.",
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "turn_detection": {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                           "silence_duration_ms": 400, "create_response": True, "interrupt_response": False},
        "input_audio_transcription": {"model": "whisper-1", "language": "en"},
        "temperature": 0.7,  # accepted, ignored: the workflow's llm step decides
        "tools": [],
    }  # fmt: skip

    async def main() -> Client:
        async with session(rig, ALIAS) as c:
            await c.send("session.update", session=update)
            await c.until("session.updated")
            return c

    c = rig.run(main)
    assert c.types() == ["session.created", "session.updated"] and c.binary == 0
    created = c.events[0]["session"]
    assert created["id"].startswith("sess_") and created["object"] == "realtime.session"
    assert created["model"] == "agent" and created["modalities"] == ["audio", "text"]
    assert created["input_audio_format"] == created["output_audio_format"] == "pcm16"
    assert created["turn_detection"] == {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                         "silence_duration_ms": 500, "create_response": True,
                                         "interrupt_response": True}  # fmt: skip
    assert created["tools"] == []
    updated = c.events[1]["session"]
    assert updated["instructions"] == "Be brief." and updated["voice"] == "alloy"
    assert updated["turn_detection"] == {"type": "server_vad", **update["turn_detection"]}
    assert updated["input_audio_transcription"]["language"] == "en"
    ids = [e["event_id"] for e in c.events]
    assert all(i.startswith("event_") for i in ids) and len(set(ids)) == len(ids)


def test_a_spoken_question_is_answered_in_openai_events(rig: Rig) -> None:
    async def main() -> Client:
        async with session(rig) as c:
            await c.stream(speech("What is the weather in Paris?") + silence(1.0))
            await c.until("casola.turn.timing")
            return c

    c = rig.run(main)
    deltas = ("response.audio.delta", "response.audio_transcript.delta")
    order = [t for i, t in enumerate(c.types()) if t not in deltas or c.types()[i - 1] != t]
    assert order[:10] == [
        "session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed", "conversation.item.created",
        "conversation.item.input_audio_transcription.completed", "response.created", "response.output_item.added",
        "conversation.item.created", "response.content_part.added"]  # fmt: skip
    assert set(order[10:-6]) == set(deltas)  # audio and its transcript, interleaved as each sentence starts
    assert order[-6:] == ["response.audio.done", "response.audio_transcript.done", "response.content_part.done",
                          "response.output_item.done", "response.done", "casola.turn.timing"]  # fmt: skip
    # The user's item: one id from speech_started on.
    started, stopped = c.of("input_audio_buffer.speech_started")[0], c.of("input_audio_buffer.speech_stopped")[0]
    committed, user = c.of("input_audio_buffer.committed")[0], c.of("conversation.item.created")[0]
    item_id = started["item_id"]
    assert stopped["item_id"] == committed["item_id"] == user["item"]["id"] == item_id
    assert 0 <= started["audio_start_ms"] < stopped["audio_end_ms"]
    assert committed["previous_item_id"] is None and user["previous_item_id"] is None
    assert user["item"]["role"] == "user"
    assert user["item"]["content"] == [{"type": "input_audio", "transcript": "turn on the lights"}]
    done_asr = c.of("conversation.item.input_audio_transcription.completed")[0]
    assert done_asr["item_id"] == item_id and done_asr["transcript"] == "turn on the lights"
    # The agent's answer: audio deltas that decode to PCM16 speech, the transcript as it is spoken.
    created = c.of("response.created")[0]["response"]
    assert created["object"] == "realtime.response" and created["status"] == "in_progress" and created["output"] == []
    rid, agent = created["id"], c.of("conversation.item.created")[1]
    assert agent["previous_item_id"] == item_id and agent["item"]["role"] == "assistant"
    where = {"response_id": rid, "item_id": agent["item"]["id"], "output_index": 0, "content_index": 0}
    audio_deltas = c.of("response.audio.delta")
    assert all({k: e[k] for k in where} == where for e in audio_deltas)
    audio = b"".join(base64.b64decode(e["delta"]) for e in audio_deltas)
    assert len(audio) % 2 == 0 and np.abs(np.frombuffer(audio, "<i2")).max() > 1000
    transcript = "".join(e["delta"] for e in c.of("response.audio_transcript.delta"))
    assert transcript == ANSWER == c.of("response.audio_transcript.done")[0]["transcript"]
    done = c.of("response.done")[0]["response"]
    assert done["id"] == rid and done["status"] == "completed" and done["status_details"] is None
    assert done["output"][0]["id"] == agent["item"]["id"] and done["output"][0]["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "audio", "transcript": ANSWER}]
    timing = c.of("casola.turn.timing")[0]
    assert timing["response_id"] == rid and 0 < timing["platform_ms"] < timing["voice_to_voice_ms"]


def test_without_turn_detection_the_client_commits_and_asks_for_the_answer(rig: Rig) -> None:
    async def main() -> Client:
        async with session(rig) as c:
            await c.send("session.update", session={"turn_detection": None})
            updated = await c.until("session.updated")
            assert updated["session"]["turn_detection"] is None
            await c.stream(speech("What is the weather in Paris?") + silence(0.3), paced=False)
            await c.send("input_audio_buffer.commit")
            await c.send("response.create")  # at once: it answers once the committed audio is transcribed
            await c.until("response.done")
            return c

    c = rig.run(main)
    assert not c.of("input_audio_buffer.speech_started") and not c.of("error")
    committed = c.of("input_audio_buffer.committed")[0]
    user = c.of("conversation.item.created")[0]
    assert user["item"]["id"] == committed["item_id"] and user["item"]["role"] == "user"
    assert user["item"]["content"][0]["transcript"] == "turn on the lights"
    assert c.of("conversation.item.input_audio_transcription.completed")[0]["item_id"] == committed["item_id"]
    types = c.types()
    assert types.index("input_audio_buffer.committed") < types.index("conversation.item.created")
    assert types.index("conversation.item.input_audio_transcription.completed") < types.index("response.created")
    assert c.of("response.done")[0]["response"]["status"] == "completed"


def test_a_text_item_is_answered_on_response_create_then_truncated_and_deleted(rig: Rig) -> None:
    async def main() -> Client:
        async with session(rig) as c:
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}
            await c.send("conversation.item.create", item=item)
            await c.until("conversation.item.created")
            await asyncio.sleep(0.3)
            assert not c.of("response.created")  # an item alone is not answered
            await c.send("response.create")
            done = (await c.until("response.done"))["response"]
            await c.send("conversation.item.truncate", item_id=done["output"][0]["id"], content_index=0,
                         audio_end_ms=300)  # fmt: skip
            await c.until("conversation.item.truncated")
            await c.send("conversation.item.delete", item_id=c.of("conversation.item.created")[0]["item"]["id"])
            await c.until("conversation.item.deleted")
            return c

    c = rig.run(main)
    user = c.of("conversation.item.created")[0]
    assert user["previous_item_id"] is None and user["item"]["status"] == "completed"
    assert user["item"]["content"] == [{"type": "input_text", "text": "Weather?"}]
    assert not c.of("conversation.item.input_audio_transcription.completed")
    done = c.of("response.done")[0]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == ANSWER
    truncated = c.of("conversation.item.truncated")[0]
    assert truncated | {"event_id": ""} == {"type": "conversation.item.truncated", "event_id": "",
                                            "item_id": done["output"][0]["id"], "content_index": 0,
                                            "audio_end_ms": 300}  # fmt: skip
    assert c.of("conversation.item.deleted")[0]["item_id"] == user["item"]["id"]


def test_response_cancel_ends_the_response_and_no_audio_of_it_follows(rig: Rig) -> None:
    async def main() -> tuple[Client, str, str]:
        async with session(rig, "rambler") as c:
            await c.say("Tell me a long story.")
            await c.until("response.audio.delta")
            await c.send("response.cancel")
            await c.until("response.done")
            await asyncio.sleep(0.3)  # anything late would have come by now
            again = await c.send("response.cancel")
            await c.until("error")
            await c.say("And then?")  # the session goes on
            second = (await c.until("response.created", 2))["response"]["id"]
            await c.until("response.audio.delta", response_id=second)
            stop = await c.send("response.cancel")
            await c.until("response.done", 2)
            return c, again, stop

    c, again, _ = rig.run(main)
    done = c.of("response.done")[0]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert done["output"][0]["status"] == "incomplete"
    at = c.events.index(c.of("response.done")[0])
    assert not [e for e in c.events[at:] if e["type"] == "response.audio.delta" and e["response_id"] == done["id"]]
    err = c.of("error")[0]["error"]
    assert err["code"] == "response_cancel_not_active" and err["event_id"] == again
    assert c.of("response.done")[1]["response"]["status"] == "cancelled"


def test_speech_over_the_answer_cancels_it_as_turn_detected(rig: Rig) -> None:
    async def main() -> Client:
        async with session(rig, "rambler") as c:
            await c.stream(speech("Tell me a long story.") + silence(0.7))
            await c.until("response.audio.delta")
            await c.stream(speech("Stop, stop.") + silence(0.7))  # the user talks over the agent
            await c.until("response.created", 2)
            await c.send("response.cancel")
            await c.until("response.done", 2)
            return c

    c = rig.run(main)
    done = c.of("response.done")[0]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    barge = c.events.index(c.of("input_audio_buffer.speech_started")[1])
    assert not [e for e in c.events[barge:] if e["type"] == "response.audio.delta" and e["response_id"] == done["id"]]
    second = c.of("conversation.item.created", previous_item_id=done["output"][0]["id"])
    assert second and second[0]["item"]["role"] == "user"  # the interruption joined the conversation after it


def test_bad_client_events_get_openai_errors_and_the_session_goes_on(rig: Rig) -> None:
    bad: list[tuple[str, dict[str, Any], str, str]] = [  # (type, fields, the error's code, its param)
        ("nonsense.event", {}, "invalid_value", "type"),
        ("input_audio_buffer.append", {"audio": "not base64 at all!"}, "invalid_value", "audio"),
        ("session.update", {"session": {"input_audio_format": "g711_ulaw"}}, "invalid_value",
         "session.input_audio_format"),
        ("session.update", {"session": {"tools": [{"type": "function", "name": "f"}]}}, "invalid_value",
         "session.tools"),
        ("response.cancel", {}, "response_cancel_not_active", ""),
        ("conversation.item.create", {"item": {"type": "function_call_output", "output": "{}"}}, "invalid_value",
         "item.type"),
        ("conversation.item.truncate", {"item_id": "item_404", "content_index": 0, "audio_end_ms": 5},
         "item_not_found", "item_id"),
    ]  # fmt: skip

    async def main() -> tuple[Client, list[str]]:
        async with session(rig) as c:
            sent = [await c.send(kind, **fields) for kind, fields, _, _ in bad]
            await c.ws.send(json.dumps({"event_id": "evt_untyped"}))
            await c.ws.send("not json")
            await c.until("error", len(bad) + 2)
            await c.say("What is the weather in Paris?")
            await c.until("response.done")
            return c, sent

    c, sent = rig.run(main)
    errors = c.of("error")
    for (kind, _, code, param), event_id, ev in zip(bad, sent, errors, strict=False):
        err = ev["error"]
        assert ev["event_id"].startswith("event_") and err["type"] == "invalid_request_error", (kind, err)
        assert (err["code"], err["param"] or "", err["event_id"]) == (code, param, event_id), (kind, err)
        assert err["message"]
    assert "g711_ulaw" in errors[2]["error"]["message"]
    untyped, not_json = errors[len(bad)]["error"], errors[len(bad) + 1]["error"]
    assert untyped["code"] == "missing_required_parameter" and untyped["event_id"] == "evt_untyped"
    assert not_json["code"] == "invalid_json" and not_json["event_id"] is None
    assert c.of("session.updated") == []  # a refused update changes nothing and says nothing else
    assert c.of("response.done")[0]["response"]["status"] == "completed"


def test_the_openai_sdks_own_realtime_client_works_with_only_the_url_changed(rig: Rig) -> None:
    """The `openai` package's beta realtime client (`client.beta.realtime.connect`), unmodified, with
    its URLs pointed at casola: the loop an OpenAI user already has. (`websocket_base_url`: the SDK
    takes wss:// from an http base URL; a TLS ingress needs only `base_url`.)"""
    openai = need_module("openai")

    async def main() -> tuple[list[str], bytes, str]:
        where = f"127.0.0.1:{rig.stack.http_port}/openai/v1"
        client = openai.AsyncOpenAI(api_key=rig.stack.api_key, base_url=f"http://{where}",
                                    websocket_base_url=f"ws://{where}")  # fmt: skip
        types: list[str] = []
        audio = bytearray()
        transcript = ""
        async with client.beta.realtime.connect(model=ALIAS) as conn:
            await conn.session.update(session={"instructions": "Be brief.", "voice": "alloy"})
            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}
            )
            await conn.response.create()
            async for event in conn:
                types.append(event.type)
                if event.type == "response.audio.delta":
                    audio += base64.b64decode(event.delta)
                elif event.type == "response.audio_transcript.done":
                    transcript = event.transcript
                elif event.type in ("response.done", "error"):
                    break
        return types, bytes(audio), transcript

    types, audio, transcript = rig.run(main)
    assert types[0] == "session.created" and "session.updated" in types and "error" not in types
    assert types[-1] == "response.done" and "response.audio.delta" in types
    assert transcript == ANSWER and len(audio) > 24000  # over half a second of 24 kHz PCM16
