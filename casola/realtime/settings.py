"""A session's settings: where they start (the REQUEST's params: `X-Casola-Param-*` on the upgrade)
and what `session.update` may change. Every value is checked; a bad one is refused naming it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from casola.realtime.errors import SessionFault
from casola.wire.meta import Param

__all__ = ["FORMATS", "VAD_KEYS", "SessionSettings"]

FORMATS: Final = ("pcm16", "opus")
# The listen stream's voice-activity settings (workers/listen.py), with their ranges.
VAD_KEYS: Final[dict[str, tuple[float, float]]] = {
    "threshold": (0.0, 1.0),
    "stop_threshold": (0.0, 1.0),
    "min_speech_ms": (0, 10_000),
    "silence_ms": (0, 10_000),
    "preroll_ms": (0, 5_000),
    "max_utterance_ms": (1_000, 120_000),
}


@dataclasses.dataclass(slots=True)
class SessionSettings:
    input_format: str = "pcm16"
    input_rate: int = 16000
    input_channels: int = 1
    server_vad: bool = True  # False: the client commits its buffer itself
    vad: dict[str, float] = dataclasses.field(default_factory=dict)
    respond: bool = True  # a transcript starts a response by itself
    interrupt: bool = True  # speech while the agent answers cancels it (barge-in)
    instructions: str = ""  # the llm step's system prompt instead of its own
    voice: str = ""
    language: str = ""  # Whisper's, for every utterance ("" = detected)

    def listen_params(self, defaults: Mapping[str, Any]) -> dict[str, Param]:
        out: dict[str, Param] = {**defaults}
        out |= {"format": self.input_format, "rate": self.input_rate, "channels": self.input_channels}
        out |= self.vad
        if self.language:
            out["language"] = self.language
        return out

    def apply(self, changes: Mapping[str, Any]) -> bool:
        """Take `changes` (the native `session.update` fields); True when the listen stream must be
        reopened (its format or voice-activity settings changed). Raises SessionFault, naming the
        field, and then changes nothing."""
        new = dataclasses.replace(self, vad=dict(self.vad))
        for key, value in changes.items():
            _set(new, key, value)
        reopen = (new.input_format, new.input_rate, new.input_channels, new.vad, new.language) != (
            self.input_format, self.input_rate, self.input_channels, self.vad, self.language)  # fmt: skip
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(new, f.name))
        return reopen

    @classmethod
    def from_params(cls, params: Mapping[str, Param]) -> SessionSettings:
        """From the REQUEST's params (strings from headers are read as numbers where one is meant)."""
        out = cls()
        for key, value in params.items():
            key = _ALIASES.get(key, key)
            if key in _FIELDS or key in VAD_KEYS:
                _set(out, key, value)
        return out

    def describe(self) -> dict[str, Any]:
        turns = {"type": "server_vad" if self.server_vad else "none", **self.vad}
        turns |= {"respond": self.respond, "interrupt": self.interrupt}
        return {
            "input_audio": {"format": self.input_format, "rate": self.input_rate, "channels": self.input_channels},
            "turn_detection": turns,
            "instructions": self.instructions or None,
            "voice": self.voice or None,
            "language": self.language or None,
        }


_ALIASES: Final = {"format": "input_format", "rate": "input_rate", "channels": "input_channels"}
_FIELDS: Final = ("input_format", "input_rate", "input_channels", "server_vad", "respond", "interrupt",
                  "instructions", "voice", "language")  # fmt: skip


def _set(s: SessionSettings, key: str, value: Any) -> None:
    if key in VAD_KEYS:
        low, high = VAD_KEYS[key]
        s.vad[key] = _number(key, value, low, high)
    elif key == "input_format":
        if value not in FORMATS:
            raise SessionFault(f"input_format must be one of {', '.join(FORMATS)}, not {value!r}", param=key)
        s.input_format = value
    elif key == "input_rate":
        s.input_rate = int(_number(key, value, 8000, 96000))
    elif key == "input_channels":
        s.input_channels = int(_number(key, value, 1, 8))
    elif key in ("server_vad", "respond", "interrupt"):
        setattr(s, key, _flag(key, value))
    elif key in ("instructions", "voice", "language"):
        if not isinstance(value, str) or len(value) > (16384 if key == "instructions" else 64):
            raise SessionFault(f"{key} must be a string (at most {16384 if key == 'instructions' else 64} characters)",
                               param=key)  # fmt: skip
        setattr(s, key, value)
    else:
        raise SessionFault(f"unknown session setting {key!r}", param=key)


def _number(key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise SessionFault(f"{key} must be a number in {low:g}..{high:g}, not {value!r}", param=key)
    return int(value) if float(value).is_integer() and key != "threshold" and key != "stop_threshold" else value


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise SessionFault(f"{key} must be true or false, not {value!r}", param=key)
    return value
