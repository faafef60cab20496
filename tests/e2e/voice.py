"""What the realtime voice-session tests share: the workflows they talk to (on the tiny model set)
and the speech they say."""

from __future__ import annotations

import subprocess
from typing import Any, Final

import numpy as np

WEATHER: Final = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
# The voice agent: a weather tool call, then three sentences (the tiny set's chat-agent).
AGENT: Final[dict[str, Any]] = {
    "steps": [
        {"name": "asr", "kind": "model", "model": "asr", "params": {"response_format": "text"}},
        {"name": "think", "kind": "llm", "model": "chat-agent", "tools": ["get_weather"]},
        {"name": "split", "kind": "sentences"},
        {"name": "speak", "kind": "model", "model": "tts"},
    ],
    "tools": {"get_weather": {"model": "tools", "parameters": WEATHER}},
}
# An answer that goes on for seconds: random words, cut into short sentences, each spoken.
RAMBLER: Final[dict[str, Any]] = {
    "steps": [
        {"name": "think", "kind": "llm", "model": "chat-random", "params": {"max_tokens": 1500}},
        {"name": "split", "kind": "sentences", "min_chars": 5, "max_chars": 30},
        {"name": "speak", "kind": "model", "model": "tts"},
    ],
}
ESPEAK_RATE: Final = 22050


def espeak(text: str, rate: int = ESPEAK_RATE) -> bytes:
    """espeak-ng saying `text`: PCM16 mono at `rate` (its own 22,050 Hz, or resampled by soxr)."""
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-w", "/dev/stdout", text], check=True, capture_output=True)
    pcm = wav.stdout[wav.stdout.index(b"data") + 8 :]
    if rate == ESPEAK_RATE:
        return pcm
    import soxr

    return bytes(soxr.resample(np.frombuffer(pcm, "<i2"), ESPEAK_RATE, rate).astype("<i2").tobytes())
