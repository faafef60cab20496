"""Text to speech: the OpenAI `audio/speech` request (and a native text contract) over pluggable engines.

Manifest (`casola.json`) of a tts model, no model files needed for espeak-ng:

    {"kind": "tts", "options": {"engine": "espeak-ng",
                                "voices": {"alloy": "en-gb+f3", ...},   # optional: request voice -> engine voice
                                "default_voice": "alloy",               # optional: when a request names none
                                "max_input_chars": 4096,                # optional
                                "fallback": "espeak-ng"}}               # optional, see below

With "fallback", an engine that cannot load (Piper without onnxruntime or its voice files) is replaced by
the fallback engine, with one warning saying why; "voices" and "default_voice" name the first engine's
voices, so the fallback uses its own aliases. Without it, the model fails to load.

Requests:
- `Content-Type: application/json`: OpenAI's body `{"model", "input", "voice", "response_format" (mp3 by
  default, like OpenAI), "speed" (0.25..4.0), "instructions" (accepted, ignored)}`.
- anything else: the body is the UTF-8 text; params `voice`, `response_format` (wav by default), `speed`.
The audio streams as it is synthesized: engine PCM16 -> `workers.encode.StreamEncoder` -> DATA frames.

Engines. An engine implements `TTSEngine` and is registered in `ENGINES` under the name the manifest's
`"engine"` option uses; its constructor takes the manifest options and the model directory (None when
there is none), and raises EngineError when it cannot run. Its `synthesize` loads nothing per call
(load the voice in `__init__`), yields PCM16 per sentence, checks `cancelled` between sentences, raises
`VoiceError` before yielding for a voice it lacks, and its `aliases` map the OpenAI voice names to its
speakers. Registered: "espeak-ng" (below) and "piper" (`workers.piper`, imported only when used).

espeak-ng is GPL-3.0-or-later: it runs as a separate process (`espeak-ng --stdout`), never linked.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

import msgspec

from casola.wire import Buffer, RequestMeta
from casola.worker.call import HandlerError
from casola.worker.model import BlockingModel, Reply, param_float, param_str
from workers.encode import FORMATS, EncodeError, StreamEncoder
from workers.spec import ModelSpec

__all__ = ["ENGINES", "OPENAI_VOICES", "EngineError", "EspeakEngine", "TTSEngine", "TTSModel", "VoiceError"]

MAX_INPUT = 4096  # characters, OpenAI's limit
SPEED_RANGE = (0.25, 4.0)  # OpenAI's range
# OpenAI's voice names; every engine maps each of them to one of its voices.
OPENAI_VOICES: Final = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar",
)  # fmt: skip

log = logging.getLogger("casola.worker")


class VoiceError(ValueError):
    """The engine has no such voice (raised by `synthesize` before any work starts)."""


class EngineError(RuntimeError):
    """The engine cannot run (binary missing) or failed while synthesizing."""


class TTSEngine(Protocol):
    name: str
    sample_rate: int  # of the PCM16 mono that `synthesize` yields
    aliases: Mapping[str, str]  # OpenAI voice name -> engine voice

    def voices(self) -> list[str]: ...

    def has_voice(self, voice: str) -> bool:
        """Whether `synthesize` accepts `voice` (`voices()` may not list every form, e.g. espeak's variants)."""
        ...

    def synthesize(self, text: str, voice: str, speed: float, cancelled: threading.Event) -> Iterator[bytes]:
        """PCM16 mono at `sample_rate`, in pieces as produced; stops once `cancelled` is set.

        Raises VoiceError at call time (not at the first `next()`) for a voice it lacks. Closing the
        iterator releases everything (process, buffers)."""
        ...


# ---------------------------------------------------------------------------------------------- espeak-ng

_RIFF = struct.Struct("<4sI4s")
_CHUNK = struct.Struct("<4sI")
_FMT = struct.Struct("<HHIIHH")  # format tag, channels, rate, byte rate, block align, bits
_READ = 65536  # os.read returns what is there (espeak writes 4 KiB at a time): big reads coalesce a backlog
_WPM = 175  # espeak's default rate, speed 1.0
_WPM_RANGE = (80, 700)  # espeak's floor; above 450 it speeds up with sonic (1.51 measured: 700 is 4x shorter)


@cache
def _espeak_voices(binary: str) -> tuple[frozenset[str], frozenset[str]]:
    """(voices, variants) that `binary` offers. Voices are language codes (`-v` also takes some
    display names, but not those with parentheses, so they are left out); mbrola voices are left out
    too (they need the mbrola binary and its voice files, and speak at 16 kHz)."""

    def table(arg: str) -> list[list[str]]:
        out = subprocess.run([binary, arg], capture_output=True, text=True, timeout=30, check=True).stdout
        return [line.split() for line in out.splitlines()[1:] if len(line.split()) >= 5]

    rows = [row for row in table("--voices") if not row[4].startswith("mb/")]
    variants = {row[4].removeprefix("!v/") for row in table("--voices=variant")}
    return frozenset(row[1].lower() for row in rows), frozenset(variants)


def _data_offset(head: bytes | bytearray) -> int | None:
    """Where the PCM starts in espeak's streaming WAV, None while the header is incomplete.

    The RIFF and data sizes are placeholders (0x7ffff000), so only the chunk layout is trusted."""
    if len(head) < _RIFF.size:
        return None
    riff, _, wave = _RIFF.unpack_from(head)
    if riff != b"RIFF" or wave != b"WAVE":
        raise EngineError("espeak-ng did not write a WAV header")
    pos = _RIFF.size
    while len(head) >= pos + _CHUNK.size:
        cid, size = _CHUNK.unpack_from(head, pos)
        pos += _CHUNK.size
        if cid == b"data":
            return pos
        if cid == b"fmt ":
            if len(head) < pos + _FMT.size:
                return None
            tag, channels, rate, _, _, bits = _FMT.unpack_from(head, pos)
            if (tag, channels, rate, bits) != (1, 1, EspeakEngine.sample_rate, 16):
                raise EngineError(f"espeak-ng wrote {bits}-bit format {tag}, {channels} ch at {rate} Hz")
        pos += size + (size & 1)
    return None


class EspeakEngine:
    """espeak-ng through its binary: one process per request, text on stdin, WAV read from stdout."""

    name = "espeak-ng"
    sample_rate = 22050
    # Distinct espeak voices for OpenAI's names; the variants (+m/+f) shift pitch and formants.
    aliases: Mapping[str, str] = {
        "alloy": "en-us",
        "ash": "en-us+m3",
        "ballad": "en-us+m5",
        "coral": "en-us+f3",
        "echo": "en-us+m2",
        "fable": "en-gb-x-rp",
        "onyx": "en-us+m7",
        "nova": "en-us+f4",
        "sage": "en-us+f2",
        "shimmer": "en-us+f5",
        "verse": "en-us+m6",
        "marin": "en-us+f1",
        "cedar": "en-us+m1",
    }

    def __init__(self, options: Mapping[str, Any] | None = None, directory: Path | None = None) -> None:
        """Raises: EngineError: the binary is not on PATH. (`directory` is unused: espeak has no model files.)"""
        binary = str((options or {}).get("binary", "espeak-ng"))
        path = shutil.which(binary)
        if path is None:
            raise EngineError(f"{binary} not found on PATH (Debian/Ubuntu: apt-get install espeak-ng)")
        self.binary = path
        self._codes, self._variants = _espeak_voices(path)

    def voices(self) -> list[str]:
        return sorted(self._codes)

    def has_voice(self, voice: str) -> bool:
        base, plus, variant = voice.partition("+")
        # espeak ignores an unknown variant silently; refuse it so a typo does not pass unnoticed
        return base.lower() in self._codes and (not plus or variant in self._variants)

    def synthesize(self, text: str, voice: str, speed: float, cancelled: threading.Event) -> Iterator[bytes]:
        if not self.has_voice(voice):
            raise VoiceError(f"espeak-ng has no voice {voice!r}")
        wpm = round(min(max(_WPM * speed, _WPM_RANGE[0]), _WPM_RANGE[1]))
        # Text goes through stdin (`--stdin` reads to EOF, then speaks): text starting with "-" is not an
        # option, and its length is not bounded by argv. `-b 1`: UTF-8 whatever the locale.
        argv = [self.binary, "--stdout", "--stdin", "-b", "1", "-v", voice, "-s", str(wpm)]
        return self._run(argv, text.replace("\0", " ").encode(), cancelled)

    def _run(self, argv: list[str], text: bytes, cancelled: threading.Event) -> Iterator[bytes]:
        # The process starts at the first next(): a generator closed unstarted has nothing to clean up.
        # stderr goes to a file: a pipe nobody drains while stdout is read could fill and stall espeak.
        err = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        except BaseException:
            err.close()
            raise
        try:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(text)  # espeak reads all stdin before writing, so this cannot deadlock
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it died at once; its exit status and stderr say why, below
            fd = proc.stdout.fileno()  # read raw: os.read returns as soon as espeak has written anything
            head = bytearray()
            start: int | None = None
            carry = b""  # an odd byte left from a read that split a sample
            while True:
                if cancelled.is_set():
                    return  # the finally kills espeak
                chunk = os.read(fd, _READ)
                if not chunk:
                    break
                if start is None:
                    head += chunk
                    start = _data_offset(head)
                    if start is None:
                        continue
                    chunk = bytes(head[start:])
                if carry:
                    chunk = carry + chunk
                cut = len(chunk) & ~1
                carry = chunk[cut:]
                if cut:
                    yield chunk if cut == len(chunk) else chunk[:cut]
            if proc.wait() != 0:
                err.seek(0)
                msg = err.read(2000).decode(errors="replace").strip() or "no message"
                raise EngineError(f"espeak-ng exited with status {proc.returncode}: {msg}")
        finally:
            if proc.returncode is None:
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout, err):
                if f is not None:
                    f.close()


def _piper(options: Mapping[str, Any], directory: Path | None) -> TTSEngine:
    from workers.piper import PiperEngine  # onnxruntime and numpy load only for a model that uses Piper

    return PiperEngine(options, directory)


ENGINES: dict[str, Callable[[Mapping[str, Any], Path | None], TTSEngine]] = {
    "espeak-ng": EspeakEngine,
    "piper": _piper,
}


# ---------------------------------------------------------------------------------------------- handler


class _Request(NamedTuple):
    text: str
    voice: str
    fmt: str
    speed: float


class TTSModel(BlockingModel):
    """Speech for text, streamed in the requested format as the engine produces it."""

    content_type = "audio/wav"

    def __init__(self, spec: ModelSpec) -> None:
        """Loads the engine (or its fallback).

        Raises:
            ValueError: an unknown engine, a bad option, or a voice the engine lacks.
            EngineError: the engine cannot run and there is no fallback (or the fallback cannot run either).
        """
        self.name = spec.name
        self.engine, options = _load_engine(spec)
        engine_name = self.engine.name
        voices = options.get("voices") or {}
        if not isinstance(voices, dict) or not all(isinstance(v, str) for v in voices.values()):
            raise ValueError(f'tts model {spec.name!r}: "voices" must map voice names to {engine_name} voices')
        self.aliases: dict[str, str] = {**self.engine.aliases, **voices}
        self.max_input = int(options.get("max_input_chars", MAX_INPUT))
        default = str(options.get("default_voice", "alloy" if "alloy" in self.aliases else ""))
        self.default_voice = self.aliases.get(default, default) or self.engine.voices()[0]
        for voice in {self.default_voice, *self.aliases.values()}:  # a manifest typo fails at load, not per request
            if not self.engine.has_voice(voice):
                raise ValueError(f"tts model {spec.name!r}: engine {engine_name} has no voice {voice!r}")

    def run_request(self, body: Buffer, meta: RequestMeta, cancelled: threading.Event) -> Reply:
        if meta.content_type.partition(";")[0].strip().lower() == "application/json":
            req = self._openai(body)
        else:
            req = self._native(body, meta)
        try:
            encoder = StreamEncoder(req.fmt, self.engine.sample_rate, 1)
        except EncodeError as exc:
            raise HandlerError(str(exc), param="response_format") from None
        pcm = self.engine.synthesize(req.text, req.voice, req.speed, cancelled)
        return Reply(encoder.content_type, _encoded(pcm, encoder, cancelled))

    # -- request parsing: every refusal names the parameter at fault ------------------------------------

    def _openai(self, body: Buffer) -> _Request:
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise HandlerError(f"the body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise HandlerError("the body must be a JSON object")
        text = doc.get("input")
        if not isinstance(text, str):
            raise HandlerError("'input' is required: the text to speak", param="input")
        voice = doc.get("voice")
        if isinstance(voice, dict):  # OpenAI's custom-voice form {"id": ...}
            voice = voice.get("id")
        if voice is not None and not isinstance(voice, str):
            raise HandlerError("'voice' must be a string", param="voice")
        fmt = doc.get("response_format", "mp3")
        if doc.get("stream_format", "audio") != "audio":
            raise HandlerError("only stream_format 'audio' is supported", param="stream_format")
        speed = doc.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, int | float):
            raise HandlerError(f"'speed' must be a number, got {speed!r}", param="speed")
        return self._check(text, voice, fmt, float(speed))

    def _native(self, body: Buffer, meta: RequestMeta) -> _Request:
        try:
            text = bytes(body).decode()
        except UnicodeDecodeError:
            raise HandlerError("the body must be UTF-8 text", param="input") from None
        params = meta.params
        voice = param_str(params, "voice") or None
        return self._check(text, voice, param_str(params, "response_format", "wav"), param_float(params, "speed", 1.0))

    def _check(self, text: str, voice: str | None, fmt: object, speed: float) -> _Request:
        if not text.strip():
            raise HandlerError("'input' is empty: nothing to speak", param="input")
        if len(text) > self.max_input:
            raise HandlerError(f"'input' has {len(text)} characters, more than {self.max_input}", param="input")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            msg = f"'response_format' must be one of {', '.join(FORMATS)}, not {fmt!r}"
            raise HandlerError(msg, param="response_format")
        if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:  # also refuses NaN
            raise HandlerError(f"'speed' must be within {SPEED_RANGE[0]}..{SPEED_RANGE[1]}, not {speed}", param="speed")
        name = (voice or "").strip()
        resolved = self.aliases.get(name) or self.aliases.get(name.lower()) or name or self.default_voice
        if not self.engine.has_voice(resolved):
            english_first = sorted(self.engine.voices(), key=lambda v: not v.startswith("en"))
            some = ", ".join([*self.aliases, *english_first[:8]])
            raise HandlerError(f"unknown voice {name!r}; try one of {some}, ...", param="voice")
        return _Request(text, resolved, fmt, speed)


def _engine_factory(spec: ModelSpec, name: str) -> Callable[[Mapping[str, Any], Path | None], TTSEngine]:
    if name not in ENGINES:
        raise ValueError(f"tts model {spec.name!r}: unknown engine {name!r} ({', '.join(ENGINES)})")
    return ENGINES[name]


def _load_engine(spec: ModelSpec) -> tuple[TTSEngine, Mapping[str, Any]]:
    """The engine the manifest names, or its fallback when it cannot run; and the options that apply."""
    # The worker's thread setting (CTranslate2's intra_threads for the other kinds) bounds a neural engine too.
    options = {"threads": spec.threads, **spec.options} if spec.threads else spec.options
    primary = _engine_factory(spec, str(options.get("engine", "espeak-ng")))
    fallback = options.get("fallback")
    second = _engine_factory(spec, str(fallback)) if fallback else None  # a typo fails even when unused
    try:
        return primary(options, spec.path), options
    except EngineError as exc:
        if second is None:
            raise
        log.warning(
            "tts model %r: engine %s cannot run (%s); using %s instead", spec.name, options.get("engine"), exc, fallback
        )
    rest = {k: v for k, v in options.items() if k not in ("voices", "default_voice")}
    return second(rest, spec.path), rest


def _encoded(pcm: Iterator[bytes], encoder: StreamEncoder, cancelled: threading.Event) -> Iterator[bytes]:
    """Encoded audio, each piece yielded as soon as the encoder has one; the engine closed at the end."""
    try:
        for piece in pcm:
            if cancelled.is_set():
                return
            out = encoder.feed(piece)
            if out:
                yield out
        tail = encoder.finish()
        if tail:
            yield tail
    finally:
        close = getattr(pcm, "close", None)
        if close is not None:
            close()
