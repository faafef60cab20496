"""The Whisper handler on the scripted tiny models: every response format, languages, raw PCM,
30 s windows, cancellation between windows, bad input, and one request through a real worker."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import msgspec
import numpy as np
import pytest

from casola.wire import RequestMeta
from casola.worker import WorkerConfig, WorkerRuntime
from casola.worker.call import HandlerError
from casola.worker.model import Reply
from workers.asr import Options, WhisperModel, _Decoded
from workers.audio import float_to_pcm16, wav_bytes
from workers.loader import resolve

SCRIPT = "turn on the lights"
SRT_CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+)\n")
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n(.+)\n")
SEGMENT_KEYS = {
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
}


@pytest.fixture(scope="module")
def asr(models_dir: Path) -> WhisperModel:
    return WhisperModel(resolve("asr", models_dir))


@pytest.fixture(scope="module")
def asr_en(models_dir: Path) -> WhisperModel:
    return WhisperModel(resolve("asr-en", models_dir))


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


class Answer(NamedTuple):
    content_type: str
    body: bytes


def call(
    model: WhisperModel, body: bytes, cancelled: threading.Event | None = None, ctype: str = "audio/wav", **params: Any
) -> Answer:
    out = model.run_request(body, RequestMeta(model.name, 0, ctype, params), cancelled or threading.Event())
    assert isinstance(out, Reply) and isinstance(out.body, bytes)  # whole answers, not streamed
    return Answer(out.content_type, out.body)


def verbose(model: WhisperModel, body: bytes, **params: Any) -> dict[str, Any]:
    r = call(model, body, response_format="verbose_json", **params)
    assert r.content_type == "application/json"
    doc: dict[str, Any] = msgspec.json.decode(r.body)
    return doc


def clock(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_json_is_the_default_and_has_usage(asr: WhisperModel) -> None:
    r = call(asr, wav_bytes(tone(2), 16000))
    assert r.content_type == "application/json"
    assert msgspec.json.decode(r.body) == {"text": SCRIPT, "usage": {"type": "duration", "seconds": 2}}
    r = call(asr, wav_bytes(tone(2.2), 16000), response_format="json")
    assert msgspec.json.decode(r.body)["usage"]["seconds"] == 3  # whole seconds, rounded up


def test_text_format(asr: WhisperModel) -> None:
    r = call(asr, wav_bytes(tone(1.5), 16000), response_format="text")
    assert r.content_type == "text/plain; charset=utf-8"
    assert r.body == (SCRIPT + "\n").encode()


def test_srt_and_vtt_cues_parse(asr: WhisperModel) -> None:
    body = wav_bytes(tone(2.5), 16000)
    srt = call(asr, body, response_format="srt").body.decode()
    cues = SRT_CUE.findall(srt)
    assert len(cues) == 1 and SRT_CUE.sub("", srt).strip() == ""  # nothing but cues
    n, *times, text = cues[0]
    assert n == "1" and text == SCRIPT
    assert clock(*times[:4]) == 0.0 and clock(*times[4:]) == 2.5
    assert srt.endswith("\n\n")

    hyphen: dict[str, Any] = {"response-format": "vtt"}  # "-" and "_" are interchangeable
    r = call(asr, body, **hyphen)
    assert r.content_type == "text/plain; charset=utf-8"
    vtt = r.body.decode()
    assert vtt.startswith("WEBVTT\n\n")
    (*times, text), *_ = VTT_CUE.findall(vtt)
    assert text == SCRIPT and clock(*times[:4]) < clock(*times[4:]) == 2.5


def test_verbose_json_shape(asr: WhisperModel) -> None:
    doc = verbose(asr, wav_bytes(tone(2), 16000), language="en")
    assert set(doc) == {"task", "language", "duration", "text", "segments", "usage"}
    assert doc["task"] == "transcribe" and doc["language"] == "english"
    assert doc["duration"] == 2.0 and doc["text"] == SCRIPT
    assert doc["usage"] == {"type": "duration", "seconds": 2}
    (seg,) = doc["segments"]
    assert set(seg) == SEGMENT_KEYS
    assert seg["id"] == 0 and seg["seek"] == 0 and 0 <= seg["start"] < seg["end"] <= 2.0
    assert seg["text"].strip() == SCRIPT and seg["tokens"] and seg["temperature"] == 0.0
    assert 0 <= seg["no_speech_prob"] < 0.5 and seg["compression_ratio"] > 0


def test_language_is_detected_named_or_rejected(asr: WhisperModel, asr_en: WhisperModel) -> None:
    body = wav_bytes(tone(1), 16000)
    assert verbose(asr, body)["language"] in ("english", "german", "french")
    assert verbose(asr, body, language="de")["language"] == "german"
    assert verbose(asr, body, language="French")["language"] == "french"  # the name works too
    doc = verbose(asr_en, body)
    assert doc["language"] == "english" and doc["text"] == "hello world"
    for model, lang in ((asr, "xx"), (asr, "ja"), (asr_en, "de")):  # ja: a Whisper code the tiny model lacks
        with pytest.raises(HandlerError) as e:
            call(model, body, language=lang)
        assert e.value.param == "language" and lang in e.value.message


def test_bad_parameters_are_400s_naming_the_parameter(asr: WhisperModel, asr_en: WhisperModel) -> None:
    body = wav_bytes(tone(1), 16000)
    cases: list[tuple[WhisperModel, dict[str, Any], str]] = [
        (asr, {"response_format": "mp3"}, "response_format"),
        (asr, {"temperature": "hot"}, "temperature"),
        (asr, {"temperature": 1.5}, "temperature"),
        (asr, {"beam_size": 0}, "beam_size"),
        (asr, {"task": "summarize"}, "task"),
        (asr_en, {"task": "translate"}, "task"),
    ]
    for model, params, name in cases:
        with pytest.raises(HandlerError) as e:
            call(model, body, **params)
        assert e.value.param == name, params


def test_decoding_options_keep_the_text(asr: WhisperModel) -> None:
    body = wav_bytes(tone(1), 16000)
    cases: list[dict[str, Any]] = [
        {"temperature": "0.7"},
        {"beam_size": 5},
        {"prompt": "Lights, please."},
        {"task": "translate"},
    ]
    for params in cases:
        doc = verbose(asr, body, **params)
        assert doc["text"] == SCRIPT, params
    assert verbose(asr, body, temperature=0.7)["segments"][0]["temperature"] == 0.7
    assert verbose(asr, body, task="translate")["task"] == "translate"
    # json with segment granularity decodes with timestamps: the same text comes back
    assert msgspec.json.decode(call(asr, body, timestamp_granularities="segment").body)["text"] == SCRIPT


def test_prompt_keeps_only_the_last_223_tokens(asr: WhisperModel) -> None:
    v = asr.vocab
    opts = Options("json", "en", "transcribe", "", 0.0, 1, False)
    prompt = asr._prompt(list(range(500)), "en", opts)
    assert prompt[0] == v.prev and prompt[1:224] == list(range(277, 500))
    assert prompt[224:] == [v.sot, v.languages["en"], v.transcribe, v.no_timestamps]


def test_raw_pcm_with_format_and_rate(asr: WhisperModel) -> None:
    pcm = float_to_pcm16(tone(2, rate=8000))
    r = call(asr, pcm, ctype="application/octet-stream", format="s16le", sample_rate="8000")
    assert msgspec.json.decode(r.body)["text"] == SCRIPT
    doc = verbose(asr, pcm, format="s16le", sample_rate=8000)
    assert doc["duration"] == pytest.approx(2.0, abs=0.01)
    stereo = float_to_pcm16(np.repeat(tone(1, rate=24000), 2))
    assert verbose(asr, stereo, format="s16le", sample_rate=24000, channels=2)["duration"] == pytest.approx(
        1.0, abs=0.01
    )


@pytest.mark.needs("espeak-ng")
def test_real_speech_from_espeak(asr: WhisperModel) -> None:
    wav = subprocess.run(["espeak-ng", "--stdout", "turn on the lights"], check=True, capture_output=True).stdout
    doc = verbose(asr, wav, filename="speech.wav")  # 22.05 kHz, streaming header sizes
    assert doc["text"] == SCRIPT and 0.5 < doc["duration"] < 5


def test_long_audio_is_transcribed_in_30s_windows(asr: WhisperModel) -> None:
    doc = verbose(asr, wav_bytes(tone(75), 16000))
    segs = doc["segments"]
    assert [s["seek"] for s in segs] == [0, 3000, 6000]
    assert [s["id"] for s in segs] == [0, 1, 2]
    assert [(s["start"], s["end"]) for s in segs] == [(0.0, 30.0), (30.0, 60.0), (60.0, 75.0)]
    assert doc["text"] == " ".join([SCRIPT] * 3) and doc["duration"] == 75.0
    srt = bytes(call(asr, wav_bytes(tone(75), 16000), response_format="srt").body).decode()
    starts = [clock(*c[1:5]) for c in SRT_CUE.findall(srt)]
    assert starts == [0.0, 30.0, 60.0]


class CancelAfter(threading.Event):
    """Reads as set from the (n+1)th look on: the handler looks once before each window."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0 or super().is_set()


def test_cancellation_stops_between_windows(asr: WhisperModel) -> None:
    ten_minutes = wav_bytes(tone(600), 16000)
    done = threading.Event()
    done.set()
    assert verbose_from(asr, ten_minutes, done)["segments"] == []  # cancelled before the first window
    segs = verbose_from(asr, ten_minutes, CancelAfter(2))["segments"]
    assert [s["start"] for s in segs] == [0.0, 30.0]  # two windows of twenty


def verbose_from(model: WhisperModel, body: bytes, cancelled: threading.Event) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.json.decode(call(model, body, cancelled, response_format="verbose_json").body)
    return doc


def test_cancel_from_another_thread_while_decoding(models_dir: Path) -> None:
    """The runtime sets `cancelled` from the event loop's thread while the handler runs in the pool."""

    class Gated(WhisperModel):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            self.windows = 0
            self.first = threading.Event()
            self.cancelled = threading.Event()

        def _decode_window(self, *a: Any) -> _Decoded:
            self.windows += 1
            self.first.set()
            assert self.cancelled.wait(10)  # hold the first window until the other thread cancels
            return super()._decode_window(*a)

    m = Gated(resolve("asr", models_dir))
    out: list[Answer] = []
    t = threading.Thread(
        target=lambda: out.append(call(m, wav_bytes(tone(600), 16000), m.cancelled, response_format="srt"))
    )
    t.start()
    assert m.first.wait(10)
    m.cancelled.set()
    t.join(10)
    assert m.windows == 1 and len(SRT_CUE.findall(bytes(out[0].body).decode())) == 1


@pytest.mark.parametrize(
    ("body", "ctype", "why"),
    [
        (b"", "audio/wav", "empty"),
        (b"\x00\x13garbage that is no audio at all" * 10, "application/octet-stream", "decode"),
        (wav_bytes(tone(1), 16000)[:30], "audio/wav", "wav"),
        (wav_bytes(tone(1), 16000)[:44], "audio/wav", "empty"),
        (b"not a wav file", "audio/wav", "wav"),
    ],
)
def test_bad_audio_is_a_400_on_the_file(asr: WhisperModel, body: bytes, ctype: str, why: str) -> None:
    with pytest.raises(HandlerError) as e:
        call(asr, body, ctype=ctype)
    assert e.value.param == "file" and why in e.value.message.lower()


def test_segmentation_of_timestamped_output(asr: WhisperModel) -> None:
    """Real models emit <|t|> text <|t|><|t|> text <|t|>; the tiny one never closes segments."""
    tb = asr.vocab.timestamp_begin
    turn, on = asr._encode(" turn on")
    whole = _Decoded([tb, turn, tb + 50, tb + 50, on, tb + 100], -0.1, 0.0, 0.0, 1.0)
    segs, advance = asr._split(whole, 3000, 3000, 7)
    assert [(s.id, s.start, s.end, s.text) for s in segs] == [(7, 30.0, 31.0, " turn"), (8, 31.0, 32.0, " on")]
    assert advance == 3000  # ended on a single timestamp: the window is done
    cut = _Decoded([tb, turn, tb + 50, tb + 50, on], -0.1, 0.0, 0.0, 1.0)
    segs, advance = asr._split(cut, 0, 3000, 0)
    assert [(s.start, s.end) for s in segs] == [(0.0, 1.0)] and advance == 100  # resume where " on" began


def test_a_worker_serves_it_over_tcp(tmp_path: Path, models_dir: Path, asr: WhisperModel) -> None:
    from tests.e2e.stack import HttpClient, Stack, run_uvloop

    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt = WorkerRuntime(WorkerConfig(queue=[stack.queue_addr], capacity=2), [asr], stack.worker_key)
        await rt.start()
        await rt.wait_registered()
        await stack.wait_workers(1, "asr")
        client = await HttpClient.connect(stack.http_port)
        head = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "audio/wav"}
        bad = await client.request("POST", "/v1/run/asr", b"RIFF nonsense", head)
        assert bad.status == 400
        fmt = {**head, "X-Casola-Param-Response-Format": "verbose_json", "X-Casola-Param-Language": "en"}
        r = await client.request("POST", "/v1/run/asr", wav_bytes(tone(2), 16000), fmt)
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        doc = msgspec.json.decode(r.body)
        assert doc["text"] == SCRIPT and doc["language"] == "english"
        await client.close()
        await rt.stop()
        await stack.stop()

    run_uvloop(main)


def test_concurrent_requests_share_one_model(asr: WhisperModel) -> None:
    body = wav_bytes(tone(3), 16000)

    async def main() -> list[Answer]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(None, call, asr, body) for _ in range(4)))

    for r in asyncio.run(main()):
        assert msgspec.json.decode(r.body)["text"] == SCRIPT


class Scripted:
    """Stands in for the CTranslate2 model's `generate` to give chosen outputs per temperature."""

    def __init__(self, real: Any, outputs: dict[float, tuple[list[int], float, float]]) -> None:
        self.real, self.outputs = real, outputs
        self.temperatures: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def generate(self, encoded: Any, prompts: list[list[int]], **kw: Any) -> list[Any]:
        t = kw.get("sampling_temperature", 0.0) if kw.get("sampling_topk") == 0 else 0.0
        self.temperatures.append(t)
        ids, score, no_speech = self.outputs.get(t, self.outputs[-1])
        return [SimpleNamespace(sequences_ids=[ids], scores=[score], no_speech_prob=no_speech)]


def test_degenerate_output_is_retried_hotter(models_dir: Path) -> None:
    m = WhisperModel(resolve("asr", models_dir))
    words = m._encode(" turn on the lights")
    loop = words * 40  # what a stuck real model produces: compresses far better than speech
    m.model = Scripted(
        m.model, {0.0: (loop, -0.2, 0.0), 0.2: (words, -1.5, 0.0), 0.4: (words, -0.3, 0.0), -1: ([], -5.0, 0.0)}
    )
    (seg,) = verbose(m, wav_bytes(tone(2), 16000))["segments"]
    assert m.model.temperatures == [0.0, 0.2, 0.4]  # loop (ratio > 2.4), unlikely (< -1), then good
    assert seg["temperature"] == 0.4 and seg["text"] == " turn on the lights"
    # nothing passes: the most likely attempt is kept
    m.model = Scripted(m.model.real, {0.6: (words, -1.5, 0.0), -1: (words, -3.0, 0.0)})
    (seg,) = verbose(m, wav_bytes(tone(2), 16000))["segments"]
    assert m.model.temperatures == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] and seg["temperature"] == 0.6
    # a sampling temperature asked for is used once, without fallback
    m.model = Scripted(m.model.real, {-1: (words, -3.0, 0.0)})
    verbose(m, wav_bytes(tone(2), 16000), temperature=0.3)
    assert m.model.temperatures == [0.3]


def test_silent_windows_are_skipped(models_dir: Path) -> None:
    m = WhisperModel(resolve("asr", models_dir))
    words = m._encode(" thank you")
    m.model = Scripted(m.model, {-1: (words, -2.0, 0.9)})  # likely no speech, and an unlikely text
    doc = verbose(m, wav_bytes(tone(65), 16000))
    assert doc["segments"] == [] and doc["text"] == "" and m.model.temperatures == [0.0] * 3
