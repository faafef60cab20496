"""The listen handler (workers.listen) on one long-lived stream: espeak-ng speech with inserted silence,
fed in 20 ms chunks as DATA frames, gives speech_started / speech_stopped / transcript lines in order and
at the right offsets, at 16, 24 and 48 kHz and as Opus; silence and noise give nothing; chunking changes
nothing; events stream while the audio is still coming, transcription runs beside the reading, and a
CANCEL ends it all.

The VAD is Silero v6 from its pinned wheel (prepare-demo's `listen` step) and the Whisper the tiny set's
scripted one, so every transcript is the script; the demo's Whisper tiny.en (its wheel) gives real words.
The tiny set's own `listen` (an energy VAD, workers.tiny_vad) runs the same path. Missing wheels, onnxruntime,
PyAV or espeak-ng skip here and fail under CASOLA_TEST_REQUIRE (tests/require.py).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from casola.wire import Frame, FrameType, RequestMeta, ResponseMeta
from casola.worker.call import HandlerError, WorkCall
from tests.require import missing, need_module, need_program
from workers.listen import NDJSON, ListenModel
from workers.loader import build, resolve
from workers.tiny import write_manifest

pytestmark = pytest.mark.needs("espeak-ng")

SCRIPT = "turn on the lights"  # what the tiny set's asr says to any audio
RATE = 16000
FIRST = "What is the weather like in Paris today?"
SECOND = "Please turn on the lights in the kitchen."


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_module("onnxruntime")
    from workers import demo

    out = tmp_path_factory.mktemp("demo")
    try:
        demo.prepare_demo(out, log=lambda _: None, only=["listen"])
    except demo.DemoError as exc:  # no index to download from, most likely
        missing("silero-vad", f"cannot get {demo.VAD_WHEEL.requirement}: {exc}")
    return out


def listen_dir(root: Path, silero: Path, asr: Path, **options: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(silero, root / "silero_vad.onnx")
    write_manifest(root, "listen", description="test", source="test", options={"asr": str(asr), **options})
    return root


@pytest.fixture(scope="module")
def model(demo_dir: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ListenModel:
    """Silero + the scripted tiny Whisper."""
    d = listen_dir(
        tmp_path_factory.mktemp("models") / "listen", demo_dir / "listen" / "silero_vad.onnx", models_dir / "asr"
    )
    return ListenModel(resolve("listen", d.parent))


def espeak(text: str) -> np.ndarray:
    from workers.audio import decode, resample, to_mono

    need_program("espeak-ng")
    wav = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True).stdout
    x, rate = decode(wav)
    y = resample(to_mono(x), rate, RATE)
    audible = np.flatnonzero(np.abs(y) > 1e-3)
    return y[audible[0] : audible[-1] + 1]


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


class Speech:
    """Two sentences: 1 s of silence, the first, 1.5 s, the second, 1 s; `truth` in ms."""

    def __init__(self) -> None:
        a, b = espeak(FIRST), espeak(SECOND)
        self.audio = np.concatenate([silence(1.0), a, silence(1.5), b, silence(1.0)])
        s1, e1 = RATE, RATE + len(a)
        s2 = e1 + int(1.5 * RATE)
        self.truth = [(s1 * 1000 // RATE, e1 * 1000 // RATE), (s2 * 1000 // RATE, (s2 + len(b)) * 1000 // RATE)]

    def pcm(self, rate: int = RATE) -> bytes:
        from workers.audio import float_to_pcm16, resample

        return float_to_pcm16(resample(self.audio, RATE, rate))


@pytest.fixture(scope="module")
def speech() -> Speech:
    return Speech()


class Link:
    """What WorkCall needs of a link, recording the frames it is given."""

    def __init__(self) -> None:
        self.conn = self
        self.frames: list[Frame] = []
        self.times: list[float] = []

    def send(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.times.append(time.perf_counter())

    def is_open(self, sid: int) -> bool:
        return True

    def flush_soon(self) -> None:
        pass

    async def drain(self) -> None:
        pass

    def lines(self) -> list[dict[str, Any]]:
        data = b"".join(bytes(f.payload) for f in self.frames if f.type is FrameType.DATA)
        return [msgspec.json.decode(line) for line in data.splitlines()]

    def types(self) -> list[str]:
        return [e["type"] + str(e.get("utterance", "")) for e in self.lines()]


def open_call(**params: Any) -> tuple[WorkCall, Link]:
    link = Link()
    meta = RequestMeta("listen", 0, "", params)
    return WorkCall(link, 1, Frame(FrameType.REQUEST, 1, meta, b"", 0)), link  # type: ignore[arg-type]


async def feed(call: WorkCall, chunks: list[bytes], pace: float = 0.0) -> None:
    for c in chunks:
        call.feed(c, False)
        await asyncio.sleep(pace)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def listen(model: ListenModel, chunks: list[bytes], **params: Any) -> Link:
    """The whole stream: REQUEST, the chunks as DATA frames (yielding between them), END; its answer."""

    async def main() -> Link:
        call, link = open_call(**params)
        task = asyncio.create_task(model(call))
        await feed(call, chunks)
        call.feed(b"", True)
        await asyncio.wait_for(task, 60)
        return link

    return asyncio.run(main())


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    t0 = time.perf_counter()
    while not check():
        assert time.perf_counter() - t0 < timeout, "timed out"
        await asyncio.sleep(0.005)


def check_two_utterances(link: Link, truth: list[tuple[int, int]], tolerance_ms: int = 100) -> list[dict[str, Any]]:
    """Each utterance started, stopped and transcribed in that order, at the truth's offsets."""
    assert link.frames[0].type is FrameType.RESPONSE and link.frames[-1].type is FrameType.END
    assert isinstance(link.frames[0].meta, ResponseMeta) and link.frames[0].meta.content_type == NDJSON
    events = link.lines()
    types = [e["type"] + str(e["utterance"]) for e in events]
    assert sorted(types) == sorted(
        f"{t}{n}" for t in ("speech_started", "speech_stopped", "transcript") for n in (1, 2)
    )
    for n in (1, 2):
        assert types.index(f"speech_started{n}") < types.index(f"speech_stopped{n}") < types.index(f"transcript{n}")
    assert types.index("speech_stopped1") < types.index("speech_started2")
    by = {e["type"] + str(e["utterance"]): e for e in events}
    for n, (onset, end) in enumerate(truth, 1):
        started, stopped, text = by[f"speech_started{n}"], by[f"speech_stopped{n}"], by[f"transcript{n}"]
        assert abs(started["onset_ms"] - onset) <= tolerance_ms, (started, onset)
        assert abs(stopped["audio_ms"] - end) <= tolerance_ms, (stopped, end)
        assert started["audio_ms"] == max(0, started["onset_ms"] - 300)  # the default pre-roll
        assert stopped["reason"] == "silence" and stopped["at_ms"] - stopped["audio_ms"] >= 500
        assert text["audio_ms"] == started["audio_ms"]
        assert abs(text["audio_ms"] + text["duration_ms"] - stopped["audio_ms"]) <= 1
        assert text["asr_ms"] > 0
    return events


# --------------------------------------------------------------------------- events
def test_two_utterances_in_20ms_chunks(model: ListenModel, speech: Speech) -> None:
    link = listen(model, pieces(speech.pcm(), 640))  # 20 ms of PCM16 at 16 kHz
    events = check_two_utterances(link, speech.truth)
    assert [e["text"] for e in events if e["type"] == "transcript"] == [SCRIPT, SCRIPT]
    assert set(events[0]) == {"type", "utterance", "audio_ms", "onset_ms", "at_ms"}
    assert set(events[1]) == {"type", "utterance", "audio_ms", "at_ms", "reason"}
    text = next(e for e in events if e["type"] == "transcript")
    assert set(text) == {"type", "utterance", "text", "language", "audio_ms", "duration_ms", "asr_ms"}


@pytest.mark.parametrize("rate", [24000, 48000, 8000])
def test_other_rates_are_resampled(model: ListenModel, speech: Speech, rate: int) -> None:
    link = listen(model, pieces(speech.pcm(rate), rate // 50 * 2), rate=rate)
    check_two_utterances(link, speech.truth)


def test_opus_packets(model: ListenModel, speech: Speech) -> None:
    av = need_module("av")
    from workers.audio import resample

    pcm = (np.clip(resample(speech.audio, RATE, 48000), -1, 1) * 32767).astype("<i2")
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate, enc.layout, enc.format, enc.bit_rate = 48000, "mono", "s16", 32000
    packets: list[bytes] = []
    for i in range(0, len(pcm) - 960 + 1, 960):  # 20 ms frames
        frame = av.AudioFrame.from_ndarray(pcm[i : i + 960][None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, i
        packets += [bytes(p) for p in enc.encode(frame)]
    packets += [bytes(p) for p in enc.encode(None)]
    bad = b"\xff\xff\xff"  # code 3 (several frames) with a frame count the packet cannot hold
    link = listen(model, [*packets[:20], bad, *packets[20:]], format="opus")  # the bad packet is skipped
    # 32 kbit/s smears the ends of words: Silero's probability decays a window or two later than on PCM.
    check_two_utterances(link, speech.truth, tolerance_ms=150)


def test_silence_and_noise_give_nothing(model: ListenModel) -> None:
    rng = np.random.default_rng(5)
    quiet = (rng.standard_normal(5 * RATE) * 0.01).astype(np.float32)  # -40 dBFS white noise
    from workers.audio import float_to_pcm16

    for audio in (silence(5), quiet):
        link = listen(model, pieces(float_to_pcm16(audio), 640))
        assert [f.type for f in link.frames] == [FrameType.RESPONSE, FrameType.END]


def test_chunk_sizes_do_not_change_the_events(model: ListenModel, speech: Speech) -> None:
    pcm = speech.pcm()

    def vad_events(chunk: int) -> list[dict[str, Any]]:
        return [e for e in listen(model, pieces(pcm, chunk), transcribe="false").lines()]

    reference = vad_events(640)
    assert len(reference) == 4
    for chunk in (333, 32000, len(pcm)):  # odd sizes split samples; one chunk is scored in the pool
        assert vad_events(chunk) == reference


def test_speech_started_is_written_while_the_utterance_goes_on(model: ListenModel, speech: Speech) -> None:
    pcm = speech.pcm()
    onset_bytes = speech.truth[0][0] * 32  # ms -> bytes at 16 kHz PCM16

    async def main() -> None:
        call, link = open_call()
        task = asyncio.create_task(model(call))
        chunks = pieces(pcm, 640)
        head = (onset_bytes + 500 * 32) // 640  # half a second into the first sentence
        await feed(call, chunks[:head])
        await until(lambda: "speech_started1" in link.types())
        assert link.types() == ["speech_started1"]  # the utterance has not ended: nothing else yet
        await feed(call, chunks[head:])
        call.feed(b"", True)
        await asyncio.wait_for(task, 60)
        assert link.types()[-1] == "transcript2"

    asyncio.run(main())


def test_transcription_runs_beside_the_reading(
    model: ListenModel, speech: Speech, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = model.whisper.transcribe
    threads: list[str] = []

    def slow(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        time.sleep(1.0)
        return real(*args)

    monkeypatch.setattr(model.whisper, "transcribe", slow)
    t0 = time.perf_counter()
    link = listen(model, pieces(speech.pcm(), 640))
    types = link.types()
    # The second utterance was heard and ended while the first one's (slow) transcript was still coming.
    assert types.index("speech_stopped2") < types.index("transcript1")
    assert types[-2:] == ["transcript1", "transcript2"]
    assert threading.main_thread().name not in threads and len(threads) == 2
    assert time.perf_counter() - t0 < 4  # two 1 s transcriptions, one after the other, nothing else waiting


def test_input_ending_mid_speech_is_flushed(model: ListenModel, speech: Speech) -> None:
    pcm = speech.pcm()[: (speech.truth[0][0] + 1200) * 32]  # stops 1.2 s into the first sentence
    link = listen(model, pieces(pcm, 640))
    events = link.lines()
    assert link.types() == ["speech_started1", "speech_stopped1", "transcript1"]
    assert events[1]["reason"] == "end" and events[2]["text"] == SCRIPT


def test_settings_change_the_segmentation(model: ListenModel, speech: Speech) -> None:
    pcm = pieces(speech.pcm(), 640)
    fast = listen(model, pcm, silence_ms=200, preroll_ms=0, min_speech_ms=64, transcribe="0").lines()
    assert [e["type"] for e in fast][:2] == ["speech_started", "speech_stopped"]
    started, stopped = fast[0], fast[1]
    assert started["audio_ms"] == started["onset_ms"] and started["at_ms"] - started["onset_ms"] == 64
    assert 200 <= stopped["at_ms"] - stopped["audio_ms"] <= 300
    # One long utterance: the 1.5 s pause is shorter than silence_ms.
    long = listen(model, pcm, silence_ms=2000, transcribe="no").lines()
    assert [e["type"] for e in long] == ["speech_started", "speech_stopped"] and long[1]["reason"] == "end"


# --------------------------------------------------------------------------- cancel and errors
def test_cancel_mid_utterance_ends_the_stream(model: ListenModel, speech: Speech) -> None:
    async def main() -> None:
        call, link = open_call()
        task = asyncio.create_task(model(call))
        chunks = pieces(speech.pcm(), 640)
        await feed(call, chunks[: (speech.truth[0][0] + 800) * 32 // 640])
        await until(lambda: "speech_started1" in link.types())
        call.cancelled = True  # what the runtime does on CANCEL
        task.cancel()
        t0 = time.perf_counter()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.perf_counter() - t0 < 0.5
        call.feed(b"".join(chunks), True)  # audio after the CANCEL is never read
        await asyncio.sleep(0.05)
        assert link.types() == ["speech_started1"] and FrameType.END not in [f.type for f in link.frames]

    asyncio.run(main())


def test_cancel_reaches_a_transcription_in_progress(
    model: ListenModel, speech: Speech, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, saw_cancel = threading.Event(), threading.Event()

    def waits(audio: np.ndarray, opts: Any, cancelled: threading.Event) -> Any:
        entered.set()
        if cancelled.wait(5):
            saw_cancel.set()
        raise RuntimeError("cancelled")

    monkeypatch.setattr(model.whisper, "transcribe", waits)

    async def main() -> None:
        call, _ = open_call()
        task = asyncio.create_task(model(call))
        await feed(call, pieces(speech.pcm(), 640))  # the input does not end: a live session
        await until(entered.is_set)
        call.cancelled = True
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert saw_cancel.wait(1)  # Whisper's `cancelled` was set: it stops before its next 30 s window


def test_a_failed_transcription_is_an_error_line(
    model: ListenModel, speech: Speech, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = model.whisper.transcribe, []

    def first_fails(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(model.whisper, "transcribe", first_fails)
    link = listen(model, pieces(speech.pcm(), 640))
    errors = [e for e in link.lines() if e["type"] == "error"]
    assert errors == [{"type": "error", "utterance": 1, "message": "RuntimeError: out of memory"}]
    assert link.types()[-1] == "transcript2" and link.frames[-1].type is FrameType.END


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"rate": 0}, "rate"),
        ({"rate": 200000}, "rate"),
        ({"format": "mp3"}, "format"),
        ({"channels": 9}, "channels"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0.5, "stop_threshold": 0.6}, "threshold"),
        ({"silence_ms": 5}, "silence_ms"),
        ({"max_utterance_ms": 500}, "max_utterance_ms"),
        ({"silence-ms": "soon"}, "silence_ms"),
        ({"language": "xx"}, "language"),
    ],
)
def test_bad_parameters_are_refused_before_answering(model: ListenModel, params: dict[str, Any], param: str) -> None:
    call, link = open_call(**params)
    with pytest.raises(HandlerError) as err:
        asyncio.run(model(call))
    assert err.value.param == param and link.frames == []


def test_threshold_alone_moves_the_stop_threshold(model: ListenModel) -> None:
    assert model._vad_config({"threshold": 0.8}).stop_threshold == pytest.approx(0.65)
    assert model._vad_config({"threshold": "0.3"}).stop_threshold == pytest.approx(0.15)
    assert model._vad_config({}).stop_threshold == 0.35
    assert model._vad_config({"stop-threshold": 0.2, "threshold": 0.6}).stop_threshold == 0.2


def test_manifest_errors(tmp_path: Path, demo_dir: Path, models_dir: Path) -> None:
    from workers.spec import SpecError
    from workers.vad import VadError

    silero = demo_dir / "listen" / "silero_vad.onnx"
    with pytest.raises(SpecError, match="is a llm model, not whisper"):
        ListenModel(resolve("a", listen_dir(tmp_path / "a", silero, models_dir / "chat").parent))
    with pytest.raises(SpecError, match=r"no casola\.json"):
        ListenModel(resolve("b", listen_dir(tmp_path / "b", silero, tmp_path / "nowhere").parent))
    with pytest.raises(SpecError, match="silence_ms must be"):
        ListenModel(resolve("c", listen_dir(tmp_path / "c", silero, models_dir / "asr", silence_ms=1).parent))
    with pytest.raises(SpecError, match="max_pending must be an integer"):
        ListenModel(resolve("d", listen_dir(tmp_path / "d", silero, models_dir / "asr", max_pending=0).parent))
    with pytest.raises(VadError, match="onnxruntime cannot load it"):
        ListenModel(resolve("e", listen_dir(tmp_path / "e", silero, models_dir / "asr", vad="nope.onnx").parent))


# --------------------------------------------------------------------------- the model sets
def test_the_tiny_set_listens_with_its_energy_vad(models_dir: Path, speech: Speech) -> None:
    need_module("onnxruntime")
    tiny = build(resolve("listen", models_dir))
    assert isinstance(tiny, ListenModel)
    # The set's Whisper is the same loaded model as the asr model's (same directory, same settings).
    assert tiny.whisper.model is build(resolve("asr", models_dir)).model  # type: ignore[attr-defined]
    link = listen(tiny, pieces(speech.pcm(), 640))
    check_two_utterances(link, speech.truth)
    assert [e["text"] for e in link.lines() if e["type"] == "transcript"] == [SCRIPT, SCRIPT]


def test_demo_whisper_gives_the_words(demo_dir: Path, speech: Speech) -> None:
    from workers import demo

    try:
        demo.prepare_demo(demo_dir, log=lambda _: None, only=["asr"])
    except demo.DemoError as exc:
        missing("demo-asr", f"cannot get {demo.ASR_WHEEL.requirement}: {exc}")
    real = ListenModel(resolve("listen", demo_dir))  # Silero + ../asr, as prepare-demo writes it
    link = listen(real, pieces(speech.pcm(), 640))
    texts = [e["text"].lower() for e in check_two_utterances(link, speech.truth) if e["type"] == "transcript"]
    assert "weather" in texts[0] and "paris" in texts[0]
    assert "lights" in texts[1] and "kitchen" in texts[1]
