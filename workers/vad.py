"""Voice activity detection and utterance segmentation, driven by samples (no clock): Silero VAD v6 on
onnxruntime (no torch, MODELS.md §7.3) and a streaming `Segmenter` that turns 16 kHz audio, in chunks of
any size, into speech-started / speech-stopped events and the audio of each utterance.

The model (`VadModel`) scores 512-sample windows (32 ms at 16 kHz). Silero v6 takes the window with the
64 samples before it (`input`, [1, 576] float32), its recurrent `state` ([2, 1, 128] float32, carried from
window to window) and `sr` (int64 16000); it returns the speech probability (`output`, [1, 1]) and the next
state (`stateN`). The context of the next window is the last 64 samples of this input. One onnxruntime
session serves every stream of the process (its `run` is thread-safe); the state and context belong to a
`VadStream`, one per audio stream.

Segmentation (`Segmenter`), on those probabilities, with hysteresis:
- idle -> pending at a window scoring >= `threshold` (its first sample is the speech's onset);
- pending -> speaking once `min_speech_ms` of consecutive windows scored >= `stop_threshold`
  (`SpeechStarted`); a window below it first discards the blip;
- speaking -> idle after `silence_ms` of consecutive windows below `stop_threshold` (`SpeechStopped`,
  then `Utterance`). Its end is the end of the last window that scored >= `threshold`: windows between
  the two thresholds keep an utterance going but do not extend it, because Silero's probability decays
  over about 100 ms after speech ends (measured on espeak-ng speech: the last window >= 0.35 ends
  110 ms after the speech, the last >= 0.5 ends 80 ms after it);
- an utterance reaching `max_utterance_ms` is cut there (reason "max_length"); the input's end cuts one
  too (reason "end", from `flush`).
Each utterance's audio starts `preroll_ms` before the onset (never before the stream's start or the last
utterance's end), so a soft first syllable the model scored late is kept. Memory is bounded by
`max_utterance_ms` plus the pre-roll and `min_speech_ms` of history.

All positions are sample offsets at 16 kHz from the stream's first sample.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from casola.wire import Buffer

__all__ = [
    "CONTEXT",
    "RATE",
    "WINDOW",
    "Event",
    "Pcm16Reader",
    "Segmenter",
    "SpeechStarted",
    "SpeechStopped",
    "Utterance",
    "VadConfig",
    "VadError",
    "VadModel",
    "VadStream",
]

RATE: Final = 16000  # the only rate Silero v6 scores at with 512-sample windows
WINDOW: Final = 512  # samples per score: 32 ms
CONTEXT: Final = 64  # samples of the previous window prepended to each input
_STATE_SHAPE: Final = (2, 1, 128)
_INPUTS: Final = {"input", "state", "sr"}
_OUTPUTS: Final = ("output", "stateN")
# The longest utterance a stream buffers: 2 minutes is 7.7 MB of float32, four of Whisper's 30 s windows.
MAX_UTTERANCE_MS: Final = 120_000


class VadError(RuntimeError):
    """The VAD model cannot be loaded or run (missing onnxruntime or file, wrong signature)."""


# --------------------------------------------------------------------------- the model
class VadModel:
    """One Silero-signature ONNX model on onnxruntime's CPU provider, shared by all streams."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        """`threads`: intra-op threads; 1 (Silero's own choice) is fastest for a model this small.

        Raises:
            VadError: onnxruntime is missing, the file cannot be loaded, or its inputs/outputs are not Silero's.
        """
        try:
            import onnxruntime
        except ImportError as exc:
            raise VadError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        try:
            self.session: Any = onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # NoSuchFile, InvalidProtobuf...: onnxruntime's own classes
            raise VadError(f"{path}: onnxruntime cannot load it ({exc})") from exc
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = tuple(o.name for o in self.session.get_outputs())
        if inputs != _INPUTS or outputs != _OUTPUTS:
            raise VadError(f"{path}: not a Silero VAD v6 model (inputs {sorted(inputs)}, outputs {list(outputs)})")
        self.path = str(path)

    def stream(self) -> VadStream:
        """Fresh state for one audio stream."""
        return VadStream(self.session)


class VadStream:
    """The recurrent state and context of one stream: call it with each 512-sample window in order."""

    __slots__ = ("_feeds", "_input", "_session")

    def __init__(self, session: Any) -> None:
        self._session = session
        self._input = np.zeros((1, CONTEXT + WINDOW), np.float32)
        self._feeds: dict[str, np.ndarray] = {
            "input": self._input,
            "state": np.zeros(_STATE_SHAPE, np.float32),
            "sr": np.array(RATE, np.int64),
        }

    def __call__(self, window: np.ndarray) -> float:
        """The speech probability of `window` (512 float32 samples at 16 kHz, the next ones in the stream)."""
        x = self._input
        x[0, :CONTEXT] = x[0, -CONTEXT:]  # the last 64 samples of the previous input
        x[0, CONTEXT:] = window
        prob, state = self._session.run(None, self._feeds)
        self._feeds["state"] = state
        return float(prob[0, 0])


# --------------------------------------------------------------------------- segmentation
@dataclass(frozen=True)
class VadConfig:
    """Segmentation settings (see the module docstring). Raises ValueError on construction when out of range."""

    threshold: float = 0.5
    stop_threshold: float = 0.35  # Silero's own default: threshold - 0.15
    min_speech_ms: int = 250
    silence_ms: int = 500
    preroll_ms: int = 300
    max_utterance_ms: int = 30_000

    def __post_init__(self) -> None:
        if not 0.0 < self.stop_threshold <= self.threshold < 1.0:
            raise ValueError(
                f"thresholds must satisfy 0 < stop_threshold <= threshold < 1, "
                f"not {self.stop_threshold} and {self.threshold}"
            )
        for name, low, high in (
            ("min_speech_ms", 0, 10_000),
            ("silence_ms", 32, 10_000),
            ("preroll_ms", 0, 5_000),
            ("max_utterance_ms", 1_000, MAX_UTTERANCE_MS),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be {low}..{high}, not {value}")


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    utterance: int  # 1, 2, ... per stream
    start: int  # where the utterance's audio begins: the onset less the pre-roll
    onset: int  # the first sample of the first window that scored >= threshold
    at: int  # input consumed when this was decided (onset + about min_speech_ms)


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    utterance: int
    end: int  # the end of the last window that scored >= threshold
    at: int  # input consumed when this was decided (end + silence_ms for reason "silence")
    reason: str  # "silence" | "max_length" | "end" (the input ended)


@dataclass(frozen=True, slots=True)
class Utterance:
    utterance: int
    start: int
    end: int
    audio: np.ndarray  # float32 [end - start] at 16 kHz: pre-roll + speech


Event = SpeechStarted | SpeechStopped | Utterance

_IDLE, _PENDING, _SPEAKING = 0, 1, 2


def _samples(ms: int) -> int:
    return ms * RATE // 1000


class Segmenter:
    """Sans-I/O: feed 16 kHz float32 samples in chunks of any size, get events; the same input gives the
    same events however it is chunked. Not thread-safe: one caller at a time (calls may move between threads)."""

    def __init__(self, score: Callable[[np.ndarray], float], config: VadConfig | None = None) -> None:
        """`score`: a window's speech probability, called once per 512-sample window in order (a VadStream)."""
        self.score = score
        self.config = cfg = config or VadConfig()
        self._min_windows = max(1, math.ceil(_samples(cfg.min_speech_ms) / WINDOW))
        self._silence_windows = max(1, math.ceil(_samples(cfg.silence_ms) / WINDOW))
        self._preroll = _samples(cfg.preroll_ms)
        self._max = _samples(cfg.max_utterance_ms)
        # Enough past windows to cover the pre-roll before a pending onset plus the pending windows.
        self._history: deque[np.ndarray] = deque(maxlen=math.ceil(self._preroll / WINDOW) + self._min_windows + 1)
        self._partial = np.zeros(0, np.float32)  # < WINDOW samples not scored yet
        self.position = 0  # samples scored
        self.utterances = 0
        self._state = _IDLE
        self._onset = self._floor = 0  # pending/speaking onset; the earliest sample a pre-roll may reach
        self._run = 0  # consecutive speech windows (pending) or non-speech windows (speaking)
        self._start = self._end = 0
        self._audio: list[np.ndarray] = []  # the current utterance's windows, from _start

    def feed(self, samples: np.ndarray) -> list[Event]:
        """Score every whole window now available; returns the events they caused, in order."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if len(self._partial):
            x = np.concatenate((self._partial, x))
        whole = len(x) - len(x) % WINDOW
        events: list[Event] = []
        for i in range(0, whole, WINDOW):
            self._window(x[i : i + WINDOW].copy(), events)  # a copy: the caller may reuse its buffer
        self._partial = x[whole:].copy()
        return events

    def flush(self) -> list[Event]:
        """The input ended: an utterance in progress stops here (reason "end"); a pending blip is dropped.
        The last partial window (< 32 ms) is not scored."""
        events: list[Event] = []
        if self._state == _SPEAKING:
            self._stop(events, "end")
        self._state = _IDLE
        return events

    # -- one window --------------------------------------------------------------------------------

    def _window(self, w: np.ndarray, events: list[Event]) -> None:
        p = self.score(w)
        begin = self.position
        self.position += WINDOW
        cfg = self.config
        if self._state == _SPEAKING:
            self._audio.append(w)
            if p >= cfg.threshold:
                self._end = self.position
            self._run = 0 if p >= cfg.stop_threshold else self._run + 1
            if self._run >= self._silence_windows:
                self._stop(events, "silence")
            elif self.position - self._start >= self._max:
                self._end = self.position  # cut mid-speech: the audio up to here is the utterance
                self._stop(events, "max_length")
            return
        self._history.append(w)
        if self._state == _PENDING and p < cfg.stop_threshold:
            self._state = _IDLE  # a blip: shorter than min_speech_ms
        elif self._state == _IDLE and p >= cfg.threshold:
            self._state, self._onset, self._run = _PENDING, begin, 0
        if self._state == _PENDING:
            self._run += 1
            if self._run >= self._min_windows:
                self._begin(events)

    def _begin(self, events: list[Event]) -> None:
        start = max(self._onset - self._preroll, self._floor, self.position - len(self._history) * WINDOW)
        past = np.concatenate(self._history)
        self._audio = [past[len(past) - (self.position - start) :]]
        self._history.clear()
        self.utterances += 1
        self._state, self._start, self._end, self._run = _SPEAKING, start, self.position, 0
        events.append(SpeechStarted(self.utterances, start, self._onset, self.position))

    def _stop(self, events: list[Event], reason: str) -> None:
        audio = np.concatenate(self._audio)[: self._end - self._start]
        events.append(SpeechStopped(self.utterances, self._end, self.position, reason))
        events.append(Utterance(self.utterances, self._start, self._end, audio))
        # The silence after the end (whole windows, appended while speaking) stays as the next pre-roll.
        self._history.clear()
        self._history.extend(self._audio[len(self._audio) - (self.position - self._end) // WINDOW :])
        self._audio = []
        self._floor = self._end
        self._state, self._run = _IDLE, 0


# --------------------------------------------------------------------------- PCM16 input
class Pcm16Reader:
    """Little-endian PCM16 bytes in chunks of any size -> float32 mono, keeping a split sample or frame
    for the next chunk; `channels` > 1 (interleaved) are averaged."""

    def __init__(self, channels: int = 1) -> None:
        if not 1 <= channels <= 8:
            raise ValueError(f"channels must be 1..8, not {channels}")
        self.channels = channels
        self._carry = b""

    def feed(self, data: Buffer) -> np.ndarray:
        frame = 2 * self.channels
        buf = memoryview(data).cast("B")
        if self._carry:
            joined = self._carry + bytes(buf)
            buf = memoryview(joined)
        whole = len(buf) - len(buf) % frame
        self._carry = bytes(buf[whole:])
        x = np.frombuffer(buf[:whole], dtype="<i2").astype(np.float32) / np.float32(32768.0)
        if self.channels > 1:
            x = x.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        return x

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (the input ended mid-sample when non-zero at the end)."""
        return len(self._carry)
