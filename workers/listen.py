"""Listening on one long-lived stream: audio in as it arrives, voice activity and transcripts out as they
happen (transformation at the worker: DESIGN.md "Realtime voice sessions", issue 16 deliverable 4).

Input: the request's payload and DATA frames, read as they come (`WorkCall.chunks()`), in the format the
REQUEST params declare:
- `format`: `pcm16` (default; little-endian signed 16-bit, `channels` interleaved, averaged to mono) or
  `opus` (each DATA payload is one raw Opus packet, RFC 6716, as RTP/WebRTC carry them; any channel
  count, decoded by PyAV at 48 kHz, less libopus's 6.5 ms encoder delay; a packet it cannot decode is
  skipped);
- `rate`: the PCM sample rate, 8000..96000 (default 16000); resampled to 16 kHz by a streaming soxr HQ;
- `channels`: 1..8 (pcm16 only; default 1);
- voice activity (workers.vad.VadConfig; defaults from the manifest's options, else VadConfig's):
  `threshold` (0.5), `stop_threshold` (default threshold - 0.15), `min_speech_ms` (250), `silence_ms`
  (500), `preroll_ms` (300), `max_utterance_ms` (30000);
- `transcribe`: false for voice activity alone (default true);
- Whisper's `language`, `prompt`, `temperature`, `beam_size` (workers.asr), for every utterance.
A bad parameter is refused (400, naming it) before anything is answered.

Output: `application/x-ndjson`, one JSON object per line, written as each event happens. Positions
(`*_ms`) are milliseconds of input audio from the stream's first sample:

    {"type": "speech_started", "utterance": 1, "audio_ms": 700, "onset_ms": 1000, "at_ms": 1256}
    {"type": "speech_stopped", "utterance": 1, "audio_ms": 2976, "at_ms": 3488, "reason": "silence"}
    {"type": "transcript", "utterance": 1, "text": "...", "language": "en",
     "audio_ms": 700, "duration_ms": 2276, "asr_ms": 41.2}
    {"type": "error", "utterance": 1, "message": "..."}      # its transcription failed; the stream goes on

`speech_started.audio_ms` is where the utterance's audio begins, pre-roll included (as OpenAI's
`audio_start_ms`); `onset_ms` is where the model first heard speech; `at_ms` is how much input had
been read when the event was decided (onset + min_speech_ms, end + silence_ms: the VAD's own latency,
on the stream's clock). `speech_stopped.reason`: silence | max_length | end (the input ended: pending
speech is flushed). A transcript covers [audio_ms, audio_ms + duration_ms). Events of one utterance
come in the order started, stopped, transcript; a transcript may come after the next utterance's
`speech_started`, because transcription runs in the thread pool, one utterance at a time, while the
next audio is read and scored. The answer ends (END) when the input has ended and the last transcript
is written; a CANCEL stops reading, scoring and transcribing (Whisper between 30 s windows).

The model directory (`casola.json` kind `listen`):

    {"kind": "listen", "options": {"vad": "silero_vad.onnx",   # the VAD model, relative to the directory
                                   "asr": "../asr",             # the Whisper model directory, relative to
                                                                # this one (a sibling, or a copy inside it)
                                   "vad_threads": 1, "max_pending": 4,
                                   "silence_ms": 500, ...}}     # VAD defaults for requests
The Whisper model loads with this model's device, compute type and threads; with the same settings as
the worker's own Whisper model of that directory it is the same loaded model (workers.device.load_once).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec
import numpy as np

from casola.wire import Buffer
from casola.wire.meta import Param
from casola.worker.call import HandlerError, WorkCall
from casola.worker.model import BlockingModel, param_bool, param_float, param_int, param_str
from workers.asr import Options, WhisperModel
from workers.audio import normalize
from workers.device import load_once
from workers.spec import ModelSpec, SpecError, read_manifest
from workers.vad import (
    RATE,
    WINDOW,
    Event,
    Pcm16Reader,
    Segmenter,
    SpeechStarted,
    SpeechStopped,
    Utterance,
    VadConfig,
    VadModel,
)

__all__ = ["NDJSON", "ListenModel", "event_line"]

NDJSON: Final = "application/x-ndjson"
_RATES: Final = (8000, 96000)
_OPUS_RATE: Final = 48000
_OPUS_PRESKIP: Final = 312  # libopus's encoder delay at 48 kHz (RFC 7845 §4.2: what OpusHead would say)
# Windows scored on the event loop; a bigger chunk (a client sending seconds at once) is scored in the pool,
# so the loop never stalls for more than ~1 ms (0.07-0.16 ms a window).
_INLINE_WINDOWS: Final = 8
_VAD_FIELDS: Final = tuple(f.name for f in dataclasses.fields(VadConfig))


def _ms(samples: int) -> int:
    return samples * 1000 // RATE


def event_line(ev: SpeechStarted | SpeechStopped) -> bytes:
    """The NDJSON line of a voice-activity event."""
    if isinstance(ev, SpeechStarted):
        doc: dict[str, Any] = {
            "type": "speech_started",
            "utterance": ev.utterance,
            "audio_ms": _ms(ev.start),
            "onset_ms": _ms(ev.onset),
            "at_ms": _ms(ev.at),
        }
    else:
        doc = {
            "type": "speech_stopped",
            "utterance": ev.utterance,
            "audio_ms": _ms(ev.end),
            "at_ms": _ms(ev.at),
            "reason": ev.reason,
        }
    return msgspec.json.encode(doc) + b"\n"


# --------------------------------------------------------------------------- input decoding
class _Decoder(Protocol):
    def feed(self, chunk: Buffer) -> np.ndarray: ...  # float32 mono at 16 kHz, possibly empty
    def flush(self) -> np.ndarray: ...


class _Resampler:
    """rate -> 16 kHz, streaming (soxr HQ keeps its filter state between chunks); a no-op at 16 kHz."""

    def __init__(self, rate: int) -> None:
        self._stream: Any = None
        if rate != RATE:
            import soxr

            self._stream = soxr.ResampleStream(rate, RATE, 1, dtype="float32", quality="HQ")

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return x
        return np.asarray(self._stream.resample_chunk(x, last=last), dtype=np.float32)


class _PcmDecoder:
    def __init__(self, rate: int, channels: int) -> None:
        self._pcm = Pcm16Reader(channels)
        self._resample = _Resampler(rate)

    def feed(self, chunk: Buffer) -> np.ndarray:
        return self._resample(self._pcm.feed(chunk))

    def flush(self) -> np.ndarray:
        return self._resample(np.zeros(0, np.float32), last=True)


class _OpusDecoder:
    """One raw Opus packet per chunk, decoded by ffmpeg's opus decoder (PyAV) at 48 kHz, then to 16 kHz."""

    def __init__(self) -> None:
        import av  # deferred: PCM-only streams never load ffmpeg

        self._av = av
        self._ctx: Any = av.CodecContext.create("opus", "r")
        self._ctx.sample_rate = _OPUS_RATE
        self._resample = _Resampler(_OPUS_RATE)
        self.skipped = 0  # packets that did not decode
        # Raw packets carry no OpusHead, so no pre-skip: drop libopus's usual encoder delay (312 samples,
        # 6.5 ms), so that positions line up with the sender's audio.
        self._skip = _OPUS_PRESKIP

    def feed(self, chunk: Buffer) -> np.ndarray:
        if not len(chunk):
            return np.zeros(0, np.float32)
        try:
            frames = self._ctx.decode(self._av.Packet(bytes(chunk)))
        except (self._av.error.FFmpegError, ValueError):
            self.skipped += 1  # a corrupt or lost packet: skip it, as a jitter buffer would
            return np.zeros(0, np.float32)
        pieces = [np.asarray(f.to_ndarray(), dtype=np.float32).reshape(len(f.layout.channels), -1) for f in frames]
        if not pieces:
            return np.zeros(0, np.float32)
        x = np.concatenate(pieces, axis=1).mean(axis=0, dtype=np.float32)
        if self._skip:
            x, self._skip = x[self._skip :], max(0, self._skip - len(x))
        return self._resample(x)

    def flush(self) -> np.ndarray:
        return self._resample(np.zeros(0, np.float32), last=True)


# --------------------------------------------------------------------------- the model
class ListenModel(BlockingModel):
    """Voice activity + transcription of one long-lived audio stream per request. A BlockingModel only
    to get the runtime's thread pool (`executor`); `__call__` is its own."""

    content_type = NDJSON

    def __init__(self, spec: ModelSpec) -> None:
        """Raises: SpecError: no directory, a bad option, or no Whisper model at `asr`;
        workers.vad.VadError: the VAD model cannot be loaded (no onnxruntime, no file, not Silero's signature)."""
        if spec.path is None:
            raise SpecError(f"model {spec.name!r}: a listen model needs a directory")
        self.name = spec.name
        opts = spec.options
        vad_path = str(spec.path / str(opts.get("vad", "silero_vad.onnx")))
        threads = _int_option(spec, "vad_threads", 1, 1, 16)
        self.vad: VadModel = load_once(("vad", vad_path, threads), lambda: VadModel(vad_path, threads))
        self.max_pending = _int_option(spec, "max_pending", 4, 1, 64)
        try:
            self.defaults = VadConfig(**{k: opts[k] for k in _VAD_FIELDS if k in opts})
        except (TypeError, ValueError) as exc:
            raise SpecError(f"model {spec.name!r}: {exc}") from None
        self.whisper = WhisperModel(_asr_spec(spec))

    # -- request -------------------------------------------------------------------------------

    def setup(self, params: Mapping[str, Param]) -> tuple[_Decoder, VadConfig, Options | None]:
        """The stream's decoder, VAD settings and transcription options, checked.

        Raises:
            HandlerError: a bad or out-of-range parameter (named in `param`).
        """
        fmt = param_str(params, "format", "pcm16").strip().lower() or "pcm16"
        rate = param_int(params, "rate", param_int(params, "sample-rate", RATE))
        if not _RATES[0] <= rate <= _RATES[1]:
            raise HandlerError(f"rate must be {_RATES[0]}..{_RATES[1]} Hz, not {rate}", param="rate")
        channels = param_int(params, "channels", 1)
        decoder: _Decoder
        if fmt in ("pcm16", "s16le", "pcm"):
            if not 1 <= channels <= 8:
                raise HandlerError(f"channels must be 1..8, not {channels}", param="channels")
            decoder = _PcmDecoder(rate, channels)
        elif fmt == "opus":
            decoder = _OpusDecoder()
        else:
            raise HandlerError(f"format must be pcm16 or opus, not {fmt!r}", param="format")
        cfg = self._vad_config(params)
        asr = self.whisper.options(params) if param_bool(params, "transcribe", True) else None
        return decoder, cfg, asr

    def _vad_config(self, params: Mapping[str, Param]) -> VadConfig:
        d = self.defaults
        values: dict[str, Any] = {}
        for name in _VAD_FIELDS:
            default, key = getattr(d, name), name.replace("_", "-")  # param_* find either spelling
            read = param_float if isinstance(default, float) else param_int
            try:
                values[name] = read(params, key, default)
            except HandlerError as exc:
                raise HandlerError(exc.message.replace(key, name), param=name) from None
        if _given(params, "threshold") and not _given(params, "stop-threshold"):
            values["stop_threshold"] = max(0.01, values["threshold"] - 0.15)  # Silero's own rule
        try:
            return VadConfig(**values)
        except ValueError as exc:
            name = next((n for n in _VAD_FIELDS if n in str(exc)), "threshold")
            raise HandlerError(str(exc), param=name) from None

    async def __call__(self, call: WorkCall) -> None:
        decoder, cfg, asr = self.setup(call.params)
        await _Session(self, call, decoder, cfg, asr).run()


class _Session:
    """One stream: read -> decode -> resample -> segment on the loop (or the pool for big chunks); each
    utterance queued (bounded: a full queue pauses reading) for one transcriber task that runs Whisper in
    the pool. Both write their lines to the answer as they have them."""

    def __init__(
        self, model: ListenModel, call: WorkCall, decoder: _Decoder, cfg: VadConfig, asr: Options | None
    ) -> None:
        self.model, self.call, self.decoder, self.asr = model, call, decoder, asr
        self.segmenter = Segmenter(model.vad.stream(), cfg)
        self.pool: Executor | None = model.executor
        self.queue: asyncio.Queue[Utterance | None] = asyncio.Queue(model.max_pending)
        self.cancelled = threading.Event()  # stops Whisper between windows
        self.busy_ms = 0.0  # VAD + ASR time, reported as `work`

    async def run(self) -> None:
        self.call.start(NDJSON)
        t0 = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as tg:
                if self.asr is not None:
                    tg.create_task(self._transcribe_all())
                await self._read()
                await self.queue.put(None)
        except BaseExceptionGroup as group:  # one task failed: the others were cancelled
            raise group.exceptions[0] from None
        finally:
            self.cancelled.set()
        self.call.work_ms = self.busy_ms or (time.perf_counter() - t0) * 1000
        self.call.end()

    async def _read(self) -> None:
        async for chunk in self.call.chunks():
            await self._segment(self.decoder.feed(chunk))
        await self._segment(self.decoder.flush())
        await self._emit(self.segmenter.flush())

    async def _segment(self, x: np.ndarray) -> None:
        if not len(x):
            return
        t = time.perf_counter()
        if len(x) > _INLINE_WINDOWS * WINDOW:
            events = await asyncio.get_running_loop().run_in_executor(self.pool, self.segmenter.feed, x)
        else:
            events = self.segmenter.feed(x)
        self.busy_ms += (time.perf_counter() - t) * 1000
        await self._emit(events)

    async def _emit(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, Utterance):
                if self.asr is not None:
                    await self.queue.put(ev)
            else:
                await self.call.write(event_line(ev))

    async def _transcribe_all(self) -> None:
        loop = asyncio.get_running_loop()
        while (utt := await self.queue.get()) is not None:
            t = time.perf_counter()
            try:
                doc = await loop.run_in_executor(self.pool, self._transcribe, utt)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            except Exception as exc:  # one utterance's failure is reported; the session goes on
                doc = {"type": "error", "utterance": utt.utterance, "message": f"{type(exc).__name__}: {exc}"}
            self.busy_ms += (time.perf_counter() - t) * 1000
            await self.call.write(msgspec.json.encode(doc) + b"\n")

    def _transcribe(self, utt: Utterance) -> dict[str, Any]:
        assert self.asr is not None
        t = time.perf_counter()
        text = self.model.whisper.transcribe(normalize(utt.audio), self.asr, self.cancelled)
        return {
            "type": "transcript",
            "utterance": utt.utterance,
            "text": text.text,
            "language": text.language,
            "audio_ms": _ms(utt.start),
            "duration_ms": _ms(utt.end - utt.start),
            "asr_ms": round((time.perf_counter() - t) * 1000, 1),
        }


# --------------------------------------------------------------------------- options
def _given(params: Mapping[str, Param], name: str) -> bool:
    return param_str(params, name) != ""


def _int_option(spec: ModelSpec, name: str, default: int, low: int, high: int) -> int:
    value = spec.options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"model {spec.name!r}: option {name} must be an integer {low}..{high}, not {value!r}")
    return value


def _asr_spec(spec: ModelSpec) -> ModelSpec:
    """The Whisper model `asr` names: a directory relative to this model's (or absolute), its manifest's
    options, this model's device settings. The path is normalised the way workers.loader spells a sibling
    (`<models_dir>/<name>`), so the same directory loads once."""
    assert spec.path is not None
    ref = spec.options.get("asr", "../asr")
    if not isinstance(ref, str) or not ref:
        raise SpecError(f"model {spec.name!r}: option asr must name the Whisper model directory")
    path = Path(os.path.normpath(spec.path / ref))
    manifest = read_manifest(path)
    if manifest["kind"] != "whisper":
        raise SpecError(f"model {spec.name!r}: asr {str(path)!r} is a {manifest['kind']} model, not whisper")
    return ModelSpec(
        name=spec.name,  # errors about language or task name the model the request asked for
        kind="whisper",
        path=path,
        device=spec.device,
        compute_type=spec.compute_type,
        threads=spec.threads,
        options=dict(manifest.get("options", {})),
    )
