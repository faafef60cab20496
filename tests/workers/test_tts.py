"""TTSModel over espeak-ng, called the way the worker runtime calls it: run_request in, pieces out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from casola.wire import RequestMeta
from casola.worker.call import HandlerError
from casola.worker.model import Reply
from workers import tts
from workers.audio import decode
from workers.spec import ModelSpec
from workers.tts import ENGINES, EngineError, EspeakEngine, TTSModel, VoiceError

pytestmark = pytest.mark.needs("espeak-ng")  # tests/require.py: skips, or fails where required

SHORT = "hello world, this is a test"
LONG = (
    "The quick brown fox jumps over the lazy dog. Meanwhile, the router keeps latency low by streaming audio "
    "as soon as it is produced, so listeners hear the first words while the rest is still being synthesized."
)
CONTENT_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "aac": "audio/aac",
}


def spec(**options: Any) -> ModelSpec:
    return ModelSpec(name="tts", kind="tts", path=None, options={"engine": "espeak-ng", **options})


@pytest.fixture(scope="module")
def model() -> TTSModel:
    return TTSModel(spec())


def native(model: TTSModel, text: str | bytes, cancelled: threading.Event | None = None, **params: Any) -> Reply:
    body = text.encode() if isinstance(text, str) else text
    return model.run_request(body, RequestMeta(model="tts", params=params), cancelled or threading.Event())


def openai(model: TTSModel, doc: Any) -> Reply:
    body = json.dumps(doc).encode()
    meta = RequestMeta(model="tts", content_type="application/json; charset=utf-8")
    return model.run_request(body, meta, threading.Event())


def pieces(reply: Reply) -> list[bytes]:
    out = [bytes(p) for p in reply.body]
    assert all(out), "no empty pieces"
    return out


def audio(reply: Reply) -> tuple[np.ndarray, int]:
    data = b"".join(pieces(reply))
    if reply.content_type == "audio/pcm":
        return decode(data, pcm_format="s16le", sample_rate=24000)
    return decode(data, content_type=reply.content_type)


def seconds(reply: Reply) -> float:
    x, rate = audio(reply)
    return float(x.shape[0] / rate)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """The espeak processes the handler starts."""
    procs: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def record(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        procs.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", record)  # the module workers.tts calls it through
    return procs


def assert_gone(proc: subprocess.Popen[bytes]) -> None:
    assert proc.returncode == -signal.SIGKILL  # killed, not run to its end
    assert not os.path.exists(f"/proc/{proc.pid}")  # and reaped: no zombie left


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
def test_each_format_decodes_to_plausible_speech(model: TTSModel, fmt: str) -> None:
    reply = native(model, SHORT, response_format=fmt)
    assert reply.content_type == CONTENT_TYPES[fmt]
    x, rate = audio(reply)
    assert rate == {"pcm": 24000, "opus": 48000}.get(fmt, 22050)
    assert 1.5 <= x.shape[0] / rate <= 3.0
    assert rms(x) > 0.02


@pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
def test_long_text_streams_in_several_pieces(model: TTSModel, fmt: str) -> None:
    got = pieces(native(model, LONG, response_format=fmt))
    assert len(got) > 1
    data = b"".join(got)
    x, rate = decode(data, pcm_format="s16le", sample_rate=24000) if fmt == "pcm" else decode(data)
    assert 8.0 <= x.shape[0] / rate <= 16.0


def test_native_default_is_wav(model: TTSModel) -> None:
    reply = native(model, SHORT)
    assert reply.content_type == "audio/wav"
    assert b"".join(pieces(reply))[:4] == b"RIFF"


def test_wav_is_the_engine_pcm_unchanged(model: TTSModel) -> None:
    wav = b"".join(pieces(native(model, SHORT)))
    raw = subprocess.run(["espeak-ng", "--stdout", "-v", "en-us", SHORT], capture_output=True, check=True).stdout
    assert wav[44:] == raw[44:]


# ---------------------------------------------------------------------------------------------- OpenAI body


def test_openai_request_defaults_to_mp3(model: TTSModel) -> None:
    reply = openai(model, {"model": "tts-1", "input": SHORT, "voice": "alloy", "instructions": "speak calmly"})
    assert reply.content_type == "audio/mpeg"
    assert 1.5 <= seconds(reply) <= 3.0


def test_openai_request_fields(model: TTSModel) -> None:
    doc = {"model": "tts", "input": SHORT, "voice": {"id": "nova"}, "response_format": "wav", "speed": 1}
    reply = openai(model, doc)
    assert reply.content_type == "audio/wav"
    x, _ = audio(reply)
    assert rms(x) > 0.02
    no_voice = openai(model, {"model": "tts", "input": SHORT, "response_format": "pcm", "stream_format": "audio"})
    assert no_voice.content_type == "audio/pcm"


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"voice": "alloy"}, "input"),
        ({"input": 42}, "input"),
        ({"input": ""}, "input"),
        ({"input": "   \n"}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"input": SHORT, "voice": "robot"}, "voice"),
        ({"input": SHORT, "voice": 3}, "voice"),
        ({"input": SHORT, "response_format": "ogg"}, "response_format"),
        ({"input": SHORT, "response_format": None}, "response_format"),
        ({"input": SHORT, "speed": 0.1}, "speed"),
        ({"input": SHORT, "speed": 4.5}, "speed"),
        ({"input": SHORT, "speed": "fast"}, "speed"),
        ({"input": SHORT, "speed": True}, "speed"),
        ({"input": SHORT, "stream_format": "sse"}, "stream_format"),
    ],
)
def test_openai_request_refusals_name_the_parameter(model: TTSModel, doc: dict[str, Any], param: str) -> None:
    with pytest.raises(HandlerError) as err:
        openai(model, doc)
    assert err.value.param == param
    assert err.value.code == HandlerError("").code  # BAD_REQUEST


@pytest.mark.parametrize("body", [b"{not json", b'["a list"]'])
def test_openai_body_must_be_a_json_object(model: TTSModel, body: bytes) -> None:
    with pytest.raises(HandlerError):
        model.run_request(body, RequestMeta(model="tts", content_type="application/json"), threading.Event())


def test_longest_input_is_accepted(model: TTSModel) -> None:
    text = ("Streaming speech keeps the first byte early. " * 100)[:4096]
    assert seconds(openai(model, {"input": text, "response_format": "wav", "speed": 4.0})) > 30


# ---------------------------------------------------------------------------------------------- native params


@pytest.mark.parametrize(
    ("text", "params", "param"),
    [
        ("", {}, "input"),
        (b"\xff\xfe", {}, "input"),
        ("x" * 4097, {}, "input"),
        (SHORT, {"speed": "fast"}, "speed"),
        (SHORT, {"speed": "0"}, "speed"),
        (SHORT, {"speed": "nan"}, "speed"),
        (SHORT, {"response_format": "webm"}, "response_format"),
        (SHORT, {"voice": "nobody"}, "voice"),
        (SHORT, {"voice": "en-us+nosuchvariant"}, "voice"),
    ],
)
def test_native_refusals_name_the_parameter(model: TTSModel, text: str, params: dict[str, Any], param: str) -> None:
    with pytest.raises(HandlerError) as err:
        native(model, text, **params)
    assert err.value.param == param


def test_speed_shortens_the_audio(model: TTSModel) -> None:
    normal = seconds(native(model, LONG, speed="1"))  # header params arrive as strings
    fast = seconds(native(model, LONG, speed=2.0))
    slow = seconds(native(model, LONG, speed=0.5))
    assert 0.4 < fast / normal < 0.6
    assert slow > normal * 1.5
    assert seconds(native(model, LONG, speed=4.0)) < fast * 0.7  # espeak-ng speeds up past 450 wpm (sonic)


def test_max_input_chars_option() -> None:
    small = TTSModel(spec(max_input_chars=10))
    with pytest.raises(HandlerError) as err:
        native(small, "eleven chars")
    assert err.value.param == "input"


# ---------------------------------------------------------------------------------------------- voices


def test_voices_openai_names_espeak_names_and_variants(model: TTSModel) -> None:
    alloy = b"".join(pieces(native(model, SHORT, voice="alloy")))
    coral = b"".join(pieces(native(model, SHORT, voice="Coral")))
    en_gb = b"".join(pieces(native(model, SHORT, voice="en-gb")))
    variant = b"".join(pieces(native(model, SHORT, voice="en-us+f3")))
    assert len({alloy, coral, en_gb}) == 3
    assert coral == variant  # coral is en-us+f3
    assert b"".join(pieces(native(model, SHORT))) == alloy  # the default voice


def test_every_openai_voice_is_a_distinct_espeak_voice(model: TTSModel) -> None:
    names = ["alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse"]
    assert len({EspeakEngine.aliases[n] for n in names}) == len(names)
    for name in names:
        x, _ = audio(native(model, "hi", voice=name))
        assert rms(x) > 0.01, name


def test_manifest_voices_and_default_voice() -> None:
    m = TTSModel(spec(voices={"alloy": "en-gb", "narrator": "en-us+m3"}, default_voice="narrator"))
    gb = b"".join(pieces(native(m, SHORT, voice="en-gb")))
    assert b"".join(pieces(native(m, SHORT, voice="alloy"))) == gb
    assert b"".join(pieces(native(m, SHORT))) == b"".join(pieces(native(m, SHORT, voice="en-us+m3")))


@pytest.mark.parametrize(
    "options",
    [{"voices": {"alloy": "nosuchlang"}}, {"voices": ["en-us"]}, {"default_voice": "nobody"}, {"engine": "x"}],
)
def test_bad_manifest_fails_at_load(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TTSModel(spec(**options))


def test_unknown_voice_error_lists_valid_ones(model: TTSModel) -> None:
    with pytest.raises(HandlerError) as err:
        openai(model, {"input": SHORT, "voice": "robot"})
    assert "alloy" in err.value.message and "en-us" in err.value.message


# ---------------------------------------------------------------------------------------------- safety


@pytest.mark.parametrize("text", ["-v nosuchlang --help", "--version", "-5 degrees"])
def test_text_starting_with_a_dash_is_spoken(model: TTSModel, text: str) -> None:
    x, rate = audio(native(model, text))
    assert x.shape[0] / rate > 0.2 and rms(x) > 0.01


def test_pcm_stays_aligned_across_odd_reads(model: TTSModel, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = b"".join(pieces(native(model, LONG)))
    monkeypatch.setattr(tts, "_READ", 333)  # every read splits a sample, and the header arrives in pieces
    engine = EspeakEngine()
    raw = list(engine.synthesize(LONG, "en-us", 1.0, threading.Event()))
    assert all(len(p) % 2 == 0 for p in raw)
    assert b"".join(pieces(native(model, LONG))) == whole


# ---------------------------------------------------------------------------------------------- cancellation


def test_closing_after_the_first_piece_kills_espeak(model: TTSModel, spawned: list[subprocess.Popen[bytes]]) -> None:
    body = native(model, LONG * 10, response_format="mp3").body
    assert isinstance(body, Generator)
    assert next(body)
    assert len(spawned) == 1 and spawned[0].returncode is None
    body.close()  # what the runtime does on CANCEL
    assert_gone(spawned[0])


def test_cancelled_event_stops_the_output(model: TTSModel, spawned: list[subprocess.Popen[bytes]]) -> None:
    cancelled = threading.Event()
    body = native(model, LONG * 10, cancelled, response_format="wav").body
    assert isinstance(body, Generator)
    first = next(body)
    cancelled.set()
    rest = list(body)
    assert len(first) + sum(map(len, rest)) < 200_000  # the whole answer is ~5 MB
    assert_gone(spawned[0])


def test_a_reply_never_started_spawns_nothing(model: TTSModel, spawned: list[subprocess.Popen[bytes]]) -> None:
    body = native(model, SHORT).body
    assert isinstance(body, Generator)
    body.close()
    assert spawned == []


def test_finished_request_leaves_no_process(model: TTSModel, spawned: list[subprocess.Popen[bytes]]) -> None:
    pieces(native(model, SHORT, response_format="flac"))
    assert spawned[0].returncode == 0
    assert spawned[0].stdout is not None and spawned[0].stdout.closed


# ---------------------------------------------------------------------------------------------- engine


def test_engine_registry_and_voice_list() -> None:
    assert ENGINES["espeak-ng"] is EspeakEngine
    engine = EspeakEngine({})
    assert engine.sample_rate == 22050 and engine.name == "espeak-ng"
    voices = engine.voices()
    assert "en-us" in voices and "en-gb" in voices
    assert not any(v.startswith("mb-") for v in voices)  # mbrola voices need a binary we do not have
    assert engine.has_voice("en-us+m3") and engine.has_voice("EN-GB") and not engine.has_voice("en-us+zz")
    with pytest.raises(VoiceError):
        engine.synthesize("hi", "nobody", 1.0, threading.Event())


def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="not found"):
        EspeakEngine({"binary": "no-such-espeak-ng"})


def test_engine_failure_is_reported_with_its_status(tmp_path: Path) -> None:
    engine = EspeakEngine()
    failing = tmp_path / "espeak-ng"
    failing.write_text("#!/bin/sh\ncat >/dev/null\necho 'Error: out of words' >&2\nexit 3\n")
    failing.chmod(0o755)
    engine.binary = str(failing)
    with pytest.raises(EngineError, match="status 3: Error: out of words"):
        list(engine.synthesize("hi", "en-us", 1.0, threading.Event()))
    engine.binary = shutil.which("false") or "/bin/false"
    with pytest.raises(EngineError, match="status 1: no message"):
        list(engine.synthesize("hi", "en-us", 1.0, threading.Event()))
    engine.binary = shutil.which("echo") or "/bin/echo"  # writes text, not a WAV
    with pytest.raises(EngineError, match="WAV header"):
        list(engine.synthesize("hi", "en-us", 1.0, threading.Event()))


def test_speed_maps_to_words_per_minute(spawned: list[subprocess.Popen[bytes]]) -> None:
    engine = EspeakEngine()
    for speed in (0.25, 1.0, 2.0, 4.0):
        list(engine.synthesize("hi", "en-us", speed, threading.Event()))
    argvs = [cast(list[str], p.args) for p in spawned]
    wpm = [int(argv[argv.index("-s") + 1]) for argv in argvs]
    assert wpm == [80, 175, 350, 700]
