"""Voice activity (workers.vad): the Segmenter's state machine on scripted probabilities, chunking
invariance, the PCM16 reader, and Silero VAD v6 itself on espeak-ng speech, silence and noise.

Silero comes from its pinned wheel the way `casola models prepare-demo` gets it (workers.demo, `listen`);
a missing wheel or onnxruntime skips here and fails under CASOLA_TEST_REQUIRE (tests/require.py). The
truth for speech positions is the silence the tests insert around trimmed espeak-ng clips.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.require import missing, need_module, need_program
from workers.vad import (
    WINDOW,
    Event,
    Pcm16Reader,
    Segmenter,
    SpeechStarted,
    SpeechStopped,
    Utterance,
    VadConfig,
    VadError,
    VadModel,
)

RATE = 16000
W_MS = WINDOW * 1000 / RATE  # 32 ms


# --------------------------------------------------------------------------- helpers
def script(*runs: tuple[float, int]) -> np.ndarray:
    """Audio whose windows carry their own probability: (p, windows) runs; `by_sample` scores them."""
    return np.concatenate([np.full(n * WINDOW, p, np.float32) for p, n in runs])


def by_sample(w: np.ndarray) -> float:
    return float(w[0])


def run(x: np.ndarray, cfg: VadConfig | None = None, chunk: int = 320, score=by_sample) -> list[Event]:  # type: ignore[no-untyped-def]
    seg = Segmenter(score, cfg)
    events: list[Event] = []
    for i in range(0, len(x), chunk):
        events += seg.feed(x[i : i + chunk])
    return events + seg.flush()


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def summary(events: list[Event]) -> list[tuple[object, ...]]:
    """Comparable events: positions, and a digest of each utterance's audio."""
    out: list[tuple[object, ...]] = []
    for e in events:
        if isinstance(e, Utterance):
            out.append(("utt", e.utterance, e.start, e.end, len(e.audio), float(np.sum(np.abs(e.audio)))))
        elif isinstance(e, SpeechStarted):
            out.append(("start", e.utterance, e.start, e.onset, e.at))
        else:
            out.append(("stop", e.utterance, e.end, e.at, e.reason))
    return out


# --------------------------------------------------------------------------- the state machine
def test_one_utterance_positions_and_audio() -> None:
    cfg = VadConfig(min_speech_ms=96, silence_ms=160, preroll_ms=64)  # 3 windows, 5 windows, 2 windows
    x = script((0.0, 10), (0.9, 20), (0.0, 10))
    started, stopped, utt = run(x, cfg)
    assert isinstance(started, SpeechStarted) and isinstance(stopped, SpeechStopped) and isinstance(utt, Utterance)
    assert started == SpeechStarted(1, start=8 * WINDOW, onset=10 * WINDOW, at=13 * WINDOW)
    assert stopped == SpeechStopped(1, end=30 * WINDOW, at=35 * WINDOW, reason="silence")
    assert (utt.utterance, utt.start, utt.end) == (1, 8 * WINDOW, 30 * WINDOW)
    np.testing.assert_array_equal(utt.audio, x[8 * WINDOW : 30 * WINDOW])  # pre-roll + speech, no tail


def test_blips_shorter_than_min_speech_are_ignored() -> None:
    cfg = VadConfig(min_speech_ms=250)  # 8 windows
    x = script((0.0, 5), (0.9, 7), (0.0, 30), (0.9, 3), (0.2, 1), (0.9, 7), (0.0, 30))
    assert run(x, cfg) == []


def test_hysteresis_between_the_thresholds() -> None:
    cfg = VadConfig(threshold=0.5, stop_threshold=0.35, min_speech_ms=96, silence_ms=160, preroll_ms=0)
    # 0.4 cannot start speech, but keeps it going: 20 windows of it do not stop the utterance...
    x = script((0.4, 10), (0.0, 10), (0.9, 5), (0.4, 20), (0.9, 2), (0.0, 10))
    started, stopped, _ = run(x, cfg)
    assert isinstance(started, SpeechStarted) and started.onset == 20 * WINDOW
    assert isinstance(stopped, SpeechStopped) and stopped.end == 47 * WINDOW  # the last window >= threshold
    # ...and windows in between do not extend it: its end is the last confident window.
    _, stopped, utt = run(script((0.9, 5), (0.4, 3), (0.1, 10)), cfg)
    assert isinstance(stopped, SpeechStopped) and stopped.end == 5 * WINDOW
    assert isinstance(utt, Utterance) and len(utt.audio) == 5 * WINDOW


def test_silence_shorter_than_silence_ms_keeps_one_utterance() -> None:
    cfg = VadConfig(silence_ms=500)  # 16 windows
    x = script((0.0, 20), (0.9, 20), (0.0, 15), (0.9, 20), (0.0, 16))
    assert kinds(run(x, cfg)) == ["SpeechStarted", "SpeechStopped", "Utterance"]
    x = script((0.0, 20), (0.9, 20), (0.0, 16), (0.9, 20), (0.0, 16))
    events = run(x, cfg)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "Utterance"] * 2
    assert [e.utterance for e in events] == [1, 1, 1, 2, 2, 2]


def test_preroll_never_reaches_before_the_stream_or_the_last_utterance() -> None:
    cfg = VadConfig(min_speech_ms=96, silence_ms=160, preroll_ms=1000)
    x = script((0.0, 2), (0.9, 10), (0.0, 5), (0.9, 10), (0.0, 5))
    first, _, u1, second, _, u2 = run(x, cfg)
    assert isinstance(first, SpeechStarted) and first.start == 0 and first.onset == 2 * WINDOW
    assert isinstance(u1, Utterance) and u1.end == 12 * WINDOW
    assert isinstance(second, SpeechStarted) and second.start == u1.end and second.onset == 17 * WINDOW
    assert isinstance(u2, Utterance) and u2.start == u1.end and len(u2.audio) == u2.end - u2.start


def test_max_utterance_cuts_and_speech_goes_on() -> None:
    cfg = VadConfig(min_speech_ms=96, silence_ms=160, preroll_ms=0, max_utterance_ms=1000)
    x = script((0.9, 80), (0.0, 10))  # 2.56 s of speech, cut at 1 s (32 windows: 1.024 s)
    events = run(x, cfg)
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    utts = [e for e in events if isinstance(e, Utterance)]
    assert [s.reason for s in stops] == ["max_length", "max_length", "silence"]
    assert [u.start for u in utts] == [0, 32 * WINDOW, 64 * WINDOW]  # no audio lost between the pieces
    assert all(len(u.audio) <= 32 * WINDOW for u in utts)


def test_the_input_ending_mid_speech_flushes_it() -> None:
    cfg = VadConfig(min_speech_ms=96, preroll_ms=0)
    seg = Segmenter(by_sample, cfg)
    events = seg.feed(script((0.0, 3), (0.9, 10)))
    assert kinds(events) == ["SpeechStarted"]
    stopped, utt = seg.flush()
    assert stopped == SpeechStopped(1, end=13 * WINDOW, at=13 * WINDOW, reason="end")
    assert isinstance(utt, Utterance) and len(utt.audio) == 10 * WINDOW
    assert seg.flush() == []
    pending = Segmenter(by_sample, cfg)
    assert pending.feed(script((0.9, 2))) == [] and pending.flush() == []  # a blip at the end: nothing


def test_chunk_sizes_do_not_change_the_events() -> None:
    rng = np.random.default_rng(7)
    runs = [(float(rng.choice([0.0, 0.2, 0.4, 0.6, 0.95])), int(rng.integers(1, 25))) for _ in range(60)]
    x = script(*runs)
    x[rng.integers(0, len(x), 200)] += 1e-3  # not constant within windows: the audio digests must match
    reference = summary(run(x, chunk=len(x)))
    assert reference  # the script has speech in it
    for chunk in (1, 7, 320, 511, 512, 513, 4096):
        assert summary(run(x, chunk=chunk)) == reference, chunk
    seg, events, pos = Segmenter(by_sample), [], 0
    for cut in sorted(rng.integers(0, len(x), 50)):
        events += seg.feed(x[pos:cut])
        pos = cut
    assert summary([*events, *seg.feed(x[pos:]), *seg.flush()]) == reference


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"threshold": 0.3, "stop_threshold": 0.4}, "stop_threshold <= threshold"),
        ({"threshold": 1.0}, "threshold < 1"),
        ({"stop_threshold": 0.0}, "0 < stop_threshold"),
        ({"silence_ms": 10}, "silence_ms must be 32..10000"),
        ({"min_speech_ms": -1}, "min_speech_ms"),
        ({"max_utterance_ms": 10**6}, "max_utterance_ms must be 1000..120000"),
        ({"preroll_ms": 6000}, "preroll_ms"),
    ],
)
def test_bad_settings(kw: dict[str, float], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        VadConfig(**kw)  # type: ignore[arg-type]


def test_pcm16_reader_keeps_split_samples_and_frames() -> None:
    pcm = (np.arange(-500, 500, dtype="<i2") * 30).tobytes()
    whole = Pcm16Reader().feed(pcm)
    r = Pcm16Reader()
    pieces = [r.feed(pcm[i : i + 3]) for i in range(0, len(pcm), 3)]  # every other piece splits a sample
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    assert r.pending == 0 and whole[0] == -500 * 30 / 32768
    stereo = np.stack([np.full(10, 1000), np.full(10, 3000)], axis=1).astype("<i2").tobytes()
    r2 = Pcm16Reader(2)
    out = np.concatenate([r2.feed(stereo[:5]), r2.feed(stereo[5:])])
    np.testing.assert_allclose(out, np.full(10, 2000 / 32768))
    assert r2.feed(b"\x01").size == 0 and r2.pending == 1
    with pytest.raises(ValueError, match="channels"):
        Pcm16Reader(9)


# --------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def silero(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """silero_vad.onnx out of the pinned wheel (prepare-demo's `listen` step)."""
    need_module("onnxruntime")
    from workers import demo

    try:
        dirs = demo.prepare_demo(tmp_path_factory.mktemp("demo"), log=lambda _: None, only=["listen"])
    except demo.DemoError as exc:  # no index to download from, most likely
        missing("silero-vad", f"cannot get {demo.VAD_WHEEL.requirement}: {exc}")
    return dirs["listen"] / "silero_vad.onnx"


@pytest.fixture(scope="module")
def vad(silero: Path) -> VadModel:
    return VadModel(silero)


def espeak(text: str) -> np.ndarray:
    """espeak-ng speech at 16 kHz, trimmed to its first and last audible sample."""
    from workers.audio import decode, resample, to_mono

    need_program("espeak-ng")
    wav = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True).stdout
    x, rate = decode(wav)
    y = resample(to_mono(x), rate, RATE)
    audible = np.flatnonzero(np.abs(y) > 1e-3)
    return y[audible[0] : audible[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def noise(seconds: float, dbfs: float = -40.0) -> np.ndarray:
    """White noise at `dbfs` RMS."""
    rng = np.random.default_rng(3)
    return (rng.standard_normal(int(seconds * RATE)) * 10 ** (dbfs / 20)).astype(np.float32)


def windows(x: np.ndarray) -> np.ndarray:
    return x[: len(x) - len(x) % WINDOW].reshape(-1, WINDOW)


def test_silero_signature_and_state(vad: VadModel, silero: Path) -> None:
    inputs = {i.name: (i.shape, i.type) for i in vad.session.get_inputs()}
    assert inputs == {
        "input": ([None, None], "tensor(float)"),
        "state": ([2, None, 128], "tensor(float)"),
        "sr": ([], "tensor(int64)"),
    }
    assert [o.name for o in vad.session.get_outputs()] == ["output", "stateN"]
    speech = espeak("hello there")
    a, b = vad.stream(), vad.stream()
    first = [a(speech[i : i + WINDOW]) for i in range(0, len(speech) - WINDOW, WINDOW)]
    assert max(first) > 0.9 and 0.0 <= min(first)
    # A fresh stream starts from zero state and gives the same scores; a stream's state carries on.
    assert [b(speech[i : i + WINDOW]) for i in range(0, len(speech) - WINDOW, WINDOW)] == first
    assert VadModel(silero).stream()(speech[:WINDOW]) == first[0]


@pytest.mark.needs("espeak-ng")
def test_two_sentences_with_silence_around(vad: VadModel) -> None:
    a, b = espeak("What is the weather like in Paris today?"), espeak("Please turn on the lights in the kitchen.")
    x = np.concatenate([silence(1.0), a, silence(1.5), b, silence(1.0)])
    truth = [(RATE, RATE + len(a)), (RATE + len(a) + int(1.5 * RATE), RATE + len(a) + int(1.5 * RATE) + len(b))]
    events = run(x, VadConfig(), score=vad.stream())
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "Utterance"] * 2
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    for (onset, end), started, stopped in zip(truth, starts, stops, strict=True):
        assert abs(started.onset - onset) <= 0.1 * RATE, (started, onset)
        assert abs(stopped.end - end) <= 0.1 * RATE, (stopped, end)
        assert started.start == started.onset - 300 * RATE // 1000  # the default pre-roll
        # silence_ms (16 windows) after the last window >= 0.35, which may be a window or two after the last >= 0.5
        assert stopped.reason == "silence" and 16 * WINDOW <= stopped.at - stopped.end <= 18 * WINDOW
        assert started.at - started.onset == 8 * WINDOW  # min_speech_ms, in windows


def test_silence_and_noise_are_not_speech(vad: VadModel) -> None:
    assert run(silence(5), score=vad.stream()) == []
    assert run(noise(5, -40.0), score=vad.stream()) == []
    scores = [vad.stream()(w) for w in windows(noise(2, -40.0))]
    assert max(scores) < 0.1


@pytest.mark.needs("espeak-ng")
def test_silero_events_do_not_depend_on_chunking(vad: VadModel) -> None:
    x = np.concatenate([silence(0.5), espeak("turn on the lights"), silence(1.0)])
    reference = summary(run(x, score=vad.stream(), chunk=len(x)))
    assert kinds_of(reference) == ["start", "stop", "utt"]
    for chunk in (320, 160 * 7, 16000):
        assert summary(run(x, score=vad.stream(), chunk=chunk)) == reference


def kinds_of(summary_: list[tuple[object, ...]]) -> list[object]:
    return [s[0] for s in summary_]


def test_a_model_that_is_not_silero_is_refused(tmp_path: Path) -> None:
    need_module("onnxruntime")
    from workers.tiny_vad import energy_vad_onnx

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(VadError, match="onnxruntime cannot load it"):
        VadModel(tmp_path / "junk.onnx")
    renamed = energy_vad_onnx().replace(b"stateN", b"stateX")  # same length: still valid protobuf
    (tmp_path / "other.onnx").write_bytes(renamed)
    with pytest.raises(VadError, match=r"not a Silero VAD v6 model .*'stateX'"):
        VadModel(tmp_path / "other.onnx")


def test_the_tiny_energy_vad_has_silero_s_signature(tmp_path: Path) -> None:
    need_module("onnxruntime")
    from workers.tiny_vad import energy_vad_onnx

    (tmp_path / "energy.onnx").write_bytes(energy_vad_onnx())
    tiny = VadModel(tmp_path / "energy.onnx")
    assert [(i.name, i.type) for i in tiny.session.get_inputs()] == [
        ("input", "tensor(float)"),
        ("state", "tensor(float)"),
        ("sr", "tensor(int64)"),
    ]
    s = tiny.stream()
    loud = [s(w) for w in windows(noise(0.32, -15.0))]
    assert min(loud) > 0.99
    fading = [s(w) for w in windows(silence(0.32))]  # the held power decays 3 dB a window
    assert fading[0] > 0.9 and fading[-1] < 0.01 and fading == sorted(fading, reverse=True)
    assert max(tiny.stream()(w) for w in windows(noise(1, -40.0))) < 0.05
