"""The unmodified `openai` SDK against `casola up`, only `base_url` changed: chat (streamed and not,
tool calls), transcription (espeak-ng speech as WAV, MP3 and OGG), speech (streamed bytes that decode
as audio of the asked format), errors as the SDK's exception classes, and a cancelled generation
that frees its worker's slot. The models are the tiny offline ones (`casola models build-tiny`).

Only the audio tests need espeak-ng (`pytest.mark.needs`, tests/require.py): without it the TTS
worker is left out and the chat, streaming, tool-call, cancel, error and model-list tests still run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest

from tests.e2e.procs import casola_up
from tests.e2e.stack import ROOT

ESPEAK = shutil.which("espeak-ng") is not None  # the TTS engine, and the spoken audio of the ASR tests
MODELS = ("asr", "chat", "chat-tools", "chat-random", *(("tts",) if ESPEAK else ()))
CONFIG = """
models_dir = "{models}"

[ingress]
openai_aliases = {{ "whisper-1" = "asr", "tts-1" = "tts", "gpt-4o-mini" = "chat" }}

[[workers]]
models = ["asr", "chat", "chat-tools"]
capacity = 4
threads = 4

[[workers]]
models = ["chat-random"]
capacity = 1
threads = 2
"""
TTS_WORKER = """
[[workers]]
models = ["tts"]
capacity = 4
"""


class Up:
    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key
        self.client = openai.OpenAI(base_url=f"{base}/openai/v1", api_key=key, max_retries=0, timeout=30)

    def health(self) -> dict[str, Any]:
        return _health(self.base)


def _health(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    root = tmp_path_factory.mktemp("openai")
    models = root / "models"
    subprocess.run(
        [sys.executable, "-m", "casola", "models", "build-tiny", str(models)], check=True, cwd=ROOT, capture_output=True
    )
    config = root / "casola.toml"
    config.write_text(CONFIG.format(models=models) + (TTS_WORKER if ESPEAK else ""))
    with casola_up(root, config, MODELS, timeout=60) as running:
        yield Up(running.base, running.key)


def _espeak(text: str) -> bytes:
    argv = ["espeak-ng", "-v", "en-us", "-w", "/dev/stdout", text]
    return subprocess.run(argv, check=True, capture_output=True).stdout


def _encode(wav: bytes, fmt: str) -> bytes:
    from workers.audio import decode, float_to_pcm16
    from workers.encode import StreamEncoder

    x, rate = decode(wav)
    enc = StreamEncoder(fmt, rate)
    return enc.feed(float_to_pcm16(x[:, 0])) + enc.finish()


# -- chat ---------------------------------------------------------------------------------------------


def test_chat_completion_whole(up: Up) -> None:
    r = up.client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Turn on the lights"}], temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content is not None
    assert r.choices[0].message.content.strip() == "Sure, turning on the lights now."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r._request_id and re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", r._request_id)  # X-Request-Id, made here
    mine = up.client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-Id": "my-id-1"}
    )
    assert mine._request_id == "my-id-1"


def test_chat_completion_streamed_chunk_for_chunk_with_usage(up: Up) -> None:
    stream = up.client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "lights?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "Sure, turning on the lights now."
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3  # token by token, not one blob
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= len(content_chunks)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "set_lights",
            "description": "Switch the lights",
            "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]},
        },
    }
]


def test_tool_calls_whole_and_streamed(up: Up) -> None:
    msgs: Any = [{"role": "user", "content": "Turn on the lights"}]
    r = up.client.chat.completions.create(model="chat-tools", messages=msgs, tools=TOOLS)  # type: ignore[arg-type]
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "set_lights" and json.loads(call.function.arguments) == {"on": True}  # type: ignore[union-attr]
    stream = up.client.chat.completions.create(model="chat-tools", messages=msgs, tools=TOOLS, stream=True)  # type: ignore[arg-type]
    deltas = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function is not None and deltas[0].function.name == "set_lights"
    args = "".join((d.function.arguments or "") for d in deltas if d.function is not None)
    assert json.loads(args) == {"on": True}


def test_cancelled_generation_frees_the_workers_slot(up: Up) -> None:
    """chat-random never stops by itself (ignore_eos) and its worker has one slot: after the client
    drops a long stream, the slot is free again and a new request is served."""
    msgs: Any = [{"role": "user", "content": "go on forever"}]
    with up.client.chat.completions.with_streaming_response.create(
        model="chat-random", messages=msgs, stream=True, max_tokens=100_000
    ) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        busy = up.health()["models"]["chat-random"]
        assert busy["free"] == 0
    end = time.monotonic() + 10
    while up.health()["models"]["chat-random"]["free"] != 1:
        assert time.monotonic() < end, "the cancelled generation kept its slot"
        time.sleep(0.05)
    r = up.client.chat.completions.create(model="chat-random", messages=msgs, max_tokens=5)
    assert r.usage is not None and r.usage.completion_tokens == 5


# -- audio --------------------------------------------------------------------------------------------


@pytest.mark.needs("espeak-ng")
@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg"])
def test_transcription_of_spoken_audio(up: Up, fmt: str) -> None:
    wav = _espeak("turn on the lights")
    audio = wav if fmt == "wav" else _encode(wav, "mp3" if fmt == "mp3" else "opus")
    r = up.client.audio.transcriptions.create(model="whisper-1", file=(f"q.{fmt}", audio))
    assert r.text.strip() == "turn on the lights"


@pytest.mark.needs("espeak-ng")
def test_transcription_formats(up: Up) -> None:
    wav = _espeak("turn on the lights")
    text = up.client.audio.transcriptions.create(model="asr", file=("q.wav", wav), response_format="text")
    assert str(text).strip() == "turn on the lights"
    srt = str(up.client.audio.transcriptions.create(model="asr", file=("q.wav", wav), response_format="srt"))
    assert srt.startswith("1\n00:00:00,000 --> ") and "turn on the lights" in srt
    vtt = str(up.client.audio.transcriptions.create(model="asr", file=("q.wav", wav), response_format="vtt"))
    assert vtt.startswith("WEBVTT") and "-->" in vtt
    v = up.client.audio.transcriptions.create(
        model="asr", file=("q.wav", wav), response_format="verbose_json", language="en"
    )
    assert v.language == "english" and v.segments and v.segments[0].end > v.segments[0].start
    assert abs(v.duration - len(wav) / 2 / 22050) < 0.1


@pytest.mark.needs("espeak-ng")
def test_bad_audio_is_a_400_and_the_worker_survives(up: Up) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        up.client.audio.transcriptions.create(model="asr", file=("q.wav", b"RIFF\x00\x00\x00\x00WAVEjunk"))
    assert err.value.status_code == 400 and "wav" in str(err.value).lower()
    with pytest.raises(openai.BadRequestError):
        up.client.audio.transcriptions.create(model="asr", file=("q.mp3", os.urandom(4000)))
    r = up.client.audio.transcriptions.create(model="asr", file=("q.wav", _espeak("hello")))
    assert r.text.strip() == "turn on the lights"


@pytest.mark.needs("espeak-ng")
@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "flac"])
def test_speech_streams_valid_audio(up: Up, fmt: str) -> None:
    from workers.audio import decode

    text = "Sure, turning on the lights now. Anything else I can do for you this evening?"
    with up.client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input=text,
        response_format=fmt,  # type: ignore[arg-type]
    ) as resp:
        pieces = [p for p in resp.iter_bytes() if p]
        ctype = resp.headers["content-type"]
    assert ctype.startswith("audio/")
    data = b"".join(pieces)
    if fmt == "pcm":
        x, rate = decode(data, pcm_format="s16le", sample_rate=24000)
    else:
        x, rate = decode(data, filename=f"speech.{fmt}")
    seconds = len(x) / rate
    assert 2.0 < seconds < 12.0
    assert float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) > 0.01  # speech, not silence


# -- errors and models --------------------------------------------------------------------------------


def test_errors_map_to_the_sdks_exception_classes(up: Up) -> None:
    msgs: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError):
        up.client.chat.completions.create(model="no-such-model", messages=msgs)
    with pytest.raises(openai.BadRequestError) as err:
        up.client.chat.completions.create(model="chat", messages=msgs, n=2)
    assert err.value.param == "n" and "Invalid 'n'" in err.value.message  # the parameter, named
    with pytest.raises(openai.BadRequestError):
        up.client.chat.completions.create(model="chat", messages=[])
    bad = openai.OpenAI(base_url=f"{up.base}/openai/v1", api_key="csk_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="chat", messages=msgs)


def test_models_lists_what_is_served_and_the_aliases(up: Up) -> None:
    ids = {m.id for m in up.client.models.list()}
    assert {"asr", "chat", "whisper-1", "tts-1", "gpt-4o-mini", *(["tts"] if ESPEAK else [])} <= ids
    assert up.client.models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError):
        up.client.models.retrieve("nope")
