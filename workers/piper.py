"""A Piper (VITS) voice on onnxruntime: text → espeak-ng IPA → phoneme ids → one model call per sentence.

Our own engine, after MODELS.md §7.2: the piper-tts package is GPL-3.0-or-later and is neither imported nor
needed. espeak-ng (also GPL) runs as a separate process, only to turn text into phonemes:
`espeak-ng -q -b 1 -v <voice> --ipa -- "<text>"` prints one line per clause without its punctuation, so the
marks are put back from the text (`, : ;` plus a space continue a sentence, `. ? !` end it). Phonemes are
NFD code points mapped through the voice's `phoneme_id_map`, framed as `[^, _, p1, _, p2, ..., pN, _, $]`;
the model takes `input` [1, N], `input_lengths` [N] and `scales` [noise, length, noise_w] and returns float
audio, peak-normalised per sentence and sent as PCM16 at the voice's rate (22,050 Hz for medium voices).

A voice directory holds `<voice>.onnx` and `<voice>.onnx.json` (Piper's layout). Manifest options:

    {"engine": "piper", "model": "en_US-joe-medium.onnx",   # relative to the model directory
     "config": "...onnx.json",    # optional, default: model + ".json"
     "espeak_binary": "espeak-ng", "threads": 0,             # onnxruntime intra-op threads (default: the
                                                             # model's `threads` setting, else onnxruntime's)
     "noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8}   # optional, default: the voice's own
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np

from workers.tts import OPENAI_VOICES, EngineError, VoiceError

__all__ = ["Phonemizer", "PiperEngine", "clauses", "phoneme_ids"]

BOS: Final = "^"
EOS: Final = "$"
PAD: Final = "_"
_CONTINUE: Final = ",:;"  # clause marks inside a sentence; any other mark ends it
# A run of clause punctuation before a space or the end. espeak-ng does not end a clause at a period followed
# by a lower-case word ("e.g. this", "A.B.C. test"), nor inside numbers ("3.5"): neither do we.
_MARK: Final = re.compile(r"[.?!,:;]+(?=\s|$)")
_LANG_FLAG: Final = re.compile(r"\([^)]*\)")  # espeak's "(en)" / "(fr)" language switches
_ESPEAK_TIMEOUT: Final = 30.0  # seconds; a call takes ~15 ms
_PEAK_FLOOR: Final = 0.01  # as Piper: a near-silent sentence is not amplified into noise


def clauses(text: str) -> list[tuple[str, str]]:
    """(clause text, its mark) in order, split where espeak-ng splits clauses; the last mark may be ""."""
    out: list[tuple[str, str]] = []
    start = 0
    for m in _MARK.finditer(text):
        if m.group().endswith(".") and text[m.end() :].lstrip()[:1].islower():
            continue
        out.append((text[start : m.start()].strip(), _mark(m.group())))
        start = m.end()
    out.append((text[start:].strip(), ""))
    return [(words, mark) for words, mark in out if words]


def _mark(run: str) -> str:
    """One mark for a run of them ("?!" asks, "..." ends, ",," continues)."""
    return "?" if "?" in run else "!" if "!" in run else run[-1]


def phoneme_ids(phonemes: str, id_map: Mapping[str, list[int]]) -> list[int]:
    """Model input ids for one sentence's phonemes: each known code point (NFD) followed by a pad, between
    bos+pad and eos. Unknown code points are skipped, as Piper does."""
    ids = [*id_map[BOS], *id_map[PAD]]
    for ch in unicodedata.normalize("NFD", phonemes):
        if (mapped := id_map.get(ch)) is not None:
            ids += mapped
            ids += id_map[PAD]
    ids += id_map[EOS]
    return ids


class Phonemizer:
    """Text → one IPA string per sentence, through the espeak-ng binary (a separate process)."""

    def __init__(self, voice: str, binary: str = "espeak-ng") -> None:
        """Raises: EngineError: no such binary on PATH."""
        path = shutil.which(binary)
        if path is None:
            raise EngineError(f"{binary} not found on PATH (Debian/Ubuntu: apt-get install espeak-ng)")
        self.binary, self.voice = path, voice

    def sentences(self, text: str) -> Iterator[str]:
        """The phonemes of each sentence, clause marks put back, as they are needed.

        Raises (while iterating):
            EngineError: espeak-ng failed.
        """
        text = " ".join(text.replace("\0", " ").split())
        parts = clauses(text)
        whole = self._ipa(text) if parts else []  # one call for all: ~15 ms
        lines: Iterator[str] = iter(whole)
        if len(whole) != len(parts):
            # espeak split differently (a dash, an abbreviation): a call per clause, as each sentence comes up,
            # keeps every mark on its own clause.
            lines = (" ".join(self._ipa(words)) for words, _ in parts)
        current = ""
        for (_, mark), ipa in zip(parts, lines, strict=True):
            if not ipa:
                continue
            current += ipa + mark + (" " if mark and mark in _CONTINUE else "")
            if mark and mark not in _CONTINUE:
                yield current
                current = ""
        if current.strip():
            yield current.rstrip()

    def _ipa(self, text: str) -> list[str]:
        # The text is an argument after "--": stdin is read in 1000-byte chunks that split clauses, and a
        # text starting with "-" is no option. Plain --ipa: --ipa=3 adds a joiner the voices have no id for.
        argv = [self.binary, "-q", "-b", "1", "-v", self.voice, "--ipa", "--", text]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=_ESPEAK_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineError(f"espeak-ng failed: {exc}") from exc
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip()[:2000] or "no message"
            raise EngineError(f"espeak-ng exited with status {proc.returncode}: {msg}")
        lines = (_LANG_FLAG.sub("", line).strip() for line in proc.stdout.decode().splitlines())
        return [line for line in lines if line]


class PiperEngine:
    """A Piper voice file on onnxruntime; loads the session once, synthesizes sentence by sentence."""

    name = "piper"

    def __init__(self, options: Mapping[str, Any] | None = None, directory: Path | None = None) -> None:
        """Raises: EngineError: onnxruntime, espeak-ng or the voice files are missing, or the voice is unusable."""
        options = options or {}
        model, config = _voice_files(options, directory)
        try:
            import onnxruntime
        except ImportError as exc:
            raise EngineError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
        try:
            voice = json.loads(config.read_text())
            self._id_map: dict[str, list[int]] = voice["phoneme_id_map"]
            self.sample_rate = int(voice["audio"]["sample_rate"])
            scales = voice.get("inference", {})
            espeak_voice = str(voice.get("espeak", {}).get("voice", "en-us"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"{config}: not a Piper voice config ({exc})") from exc
        self._scales = [float(options.get(k, scales.get(k, d))) for k, d in _SCALES]
        self._phonemizer = Phonemizer(espeak_voice, str(options.get("espeak_binary", "espeak-ng")))
        self._session = _session(onnxruntime, model, int(options.get("threads", 0)))
        # A single-speaker voice answers to its file name; a multi-speaker one to its speakers' names.
        self._speakers: dict[str, int | None] = {str(k): int(v) for k, v in voice.get("speaker_id_map", {}).items()}
        if not self._speakers:
            self._speakers = {model.name.removesuffix(".onnx"): None}
        first = next(iter(self._speakers))
        self.aliases: Mapping[str, str] = dict.fromkeys(OPENAI_VOICES, first)

    def voices(self) -> list[str]:
        return list(self._speakers)

    def has_voice(self, voice: str) -> bool:
        return voice in self._speakers

    def synthesize(self, text: str, voice: str, speed: float, cancelled: threading.Event) -> Iterator[bytes]:
        if not self.has_voice(voice):
            raise VoiceError(f"piper voice has no speaker {voice!r}")
        return self._sentences(text, self._speakers[voice], speed, cancelled)

    def _sentences(self, text: str, speaker: int | None, speed: float, cancelled: threading.Event) -> Iterator[bytes]:
        for phonemes in self._phonemizer.sentences(text):
            if cancelled.is_set():
                return
            yield self.sentence_pcm(phoneme_ids(phonemes, self._id_map), speaker, speed)

    def sentence_pcm(self, ids: list[int], speaker: int | None = None, speed: float = 1.0) -> bytes:
        """PCM16 of one sentence's phoneme ids: one model call.

        Raises:
            EngineError: onnxruntime failed.
        """
        noise, length, noise_w = self._scales
        feeds: dict[str, np.ndarray] = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array([noise, length / speed, noise_w], dtype=np.float32),
        }
        if speaker is not None:
            feeds["sid"] = np.array([speaker], dtype=np.int64)
        try:
            audio = np.asarray(self._session.run(None, feeds)[0], dtype=np.float32).reshape(-1)
        except Exception as exc:  # onnxruntime raises its own RuntimeError subclasses, not importable here
            raise EngineError(f"piper voice failed: {exc}") from exc
        peak = max(_PEAK_FLOOR, float(np.max(np.abs(audio)))) if audio.size else 1.0
        pcm: bytes = np.clip(audio * (32767.0 / peak), -32767, 32767).astype("<i2").tobytes()
        return pcm


_SCALES: Final = (("noise_scale", 0.667), ("length_scale", 1.0), ("noise_w", 0.8))  # Piper's defaults


def _voice_files(options: Mapping[str, Any], directory: Path | None) -> tuple[Path, Path]:
    name = options.get("model")
    if not isinstance(name, str) or not name:
        raise EngineError('piper needs the "model" option: the voice\'s .onnx file')
    base = directory if directory is not None else Path()
    model = base / name
    config = base / str(options.get("config") or f"{name}.json")
    for path in (model, config):
        if not path.is_file():
            raise EngineError(f"piper voice file {path} is missing")
    return model, config


def _session(onnxruntime: Any, model: Path, threads: int) -> Any:
    opts = onnxruntime.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # InvalidProtobuf, Fail...: onnxruntime's own classes
        raise EngineError(f"{model}: onnxruntime cannot load it ({exc})") from exc
