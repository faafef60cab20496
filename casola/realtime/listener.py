"""A session's ears: its audio on one long-lived stream to a `listen` worker (workers/listen.py),
whose NDJSON events (speech_started, speech_stopped, transcript, error) come back as they happen.

The stream opens with the first audio and lives as long as the session's input format does. When
it fails (its worker died, or was drained), the failure is reported once and the next audio opens a
new one, on whichever worker the node picks: a session outlives its listen worker. Positions in
the events are made session-wide (`offset_ms`: the audio the earlier streams were given).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import perf_counter
from typing import Any

import msgspec

from casola.client import RequestFailed, Stream
from casola.flow.frontdoor import FrontDoor
from casola.net.errors import ConnectionLost
from casola.wire import Buffer, ErrorCode, RequestMeta
from casola.wire.meta import Param

__all__ = ["Listener"]

log = logging.getLogger("casola.realtime")

_decode = msgspec.json.Decoder().decode
# (event, perf_counter() at its arrival)
OnEvent = Callable[[dict[str, Any], float], None]
# (wire code, message): the stream failed; the next audio opens another
OnLost = Callable[[int, str], None]
_POSITIONS = ("audio_ms", "onset_ms", "at_ms")


class Listener:
    def __init__(self, door: FrontDoor, head: RequestMeta, on_event: OnEvent, on_lost: OnLost) -> None:
        """`head`: the listen stream's REQUEST (model, tenant, params: format, rate, VAD settings)."""
        self.door, self.on_event, self.on_lost = door, on_event, on_lost
        self.stream: Stream | None = None
        self.readers: set[asyncio.Task[None]] = set()
        self.offset_ms = 0.0  # audio given to the streams before this one
        self.utterances = 0  # the highest utterance number so far (numbers are session-wide)
        self.fed_ms = 0.0  # audio given to this one (pcm16; Opus: its packets' wall-clock span)
        self._t_open = 0.0
        self.retune(head)

    def retune(self, head: RequestMeta) -> None:
        """New settings: the stream open now is dropped (CANCEL); the next audio opens one with them."""
        self.close()
        self.head = head
        self._ms_per_byte = _ms_per_byte(head.params)

    def feed(self, audio: Buffer) -> None:
        """The next piece of the session's audio (raises nothing: a failed stream is reported)."""
        stream = self.stream or self._open()
        if stream is None:
            return
        try:
            stream.send(audio)
        except ConnectionLost as exc:
            self._lost(stream, ErrorCode.SHUTTING_DOWN, f"the queue node link is gone ({exc})")
            return
        self.fed_ms += len(audio) * self._ms_per_byte if self._ms_per_byte else 0.0

    def end(self) -> None:
        """End the stream's input now: the worker flushes pending speech (its events still come)
        and finishes; the next audio opens another."""
        if self.stream is not None:
            self.stream.end_input()
            self.stream = None
            self._next_offset(room=1)  # its last utterance may still come: the next stream counts after it

    def close(self) -> None:
        """Stop listening now (the session is over, or its settings changed): CANCEL."""
        stream, self.stream = self.stream, None
        if stream is not None:
            self.door.cancel(stream)
            self._next_offset()

    def _open(self) -> Stream | None:
        try:
            stream = self.door.open(self.head, b"", end=False)
        except (RequestFailed, ConnectionLost) as exc:
            code = exc.code if isinstance(exc, RequestFailed) else ErrorCode.SHUTTING_DOWN
            self.on_lost(code, f"the listen stream could not open: {exc}")
            return None
        self.stream, self._t_open, self.fed_ms = stream, perf_counter(), 0.0
        reader = asyncio.ensure_future(self._read(stream, self.offset_ms, self.utterances))
        self.readers.add(reader)
        reader.add_done_callback(self.readers.discard)
        return stream

    async def _read(self, stream: Stream, offset_ms: float, base: int) -> None:
        """One stream's events, placed session-wide: positions after `offset_ms`, utterances after `base`."""
        buf = b""
        try:
            async for chunk in stream:
                buf = buf + bytes(chunk) if buf else bytes(chunk)
                *lines, buf = buf.split(b"\n")
                now = perf_counter()
                for line in lines:
                    if line.strip():
                        self.on_event(self._placed(_decode(line), offset_ms, base), now)
        except RequestFailed as exc:
            if exc.code != ErrorCode.CANCELLED:
                self._lost(stream, exc.code, exc.message)
            return
        except ConnectionLost as exc:
            self._lost(stream, ErrorCode.SHUTTING_DOWN, str(exc))
            return
        except msgspec.DecodeError as exc:
            log.warning("listen model %s sent a line that is not JSON: %s", self.head.model, exc)
            self.door.cancel(stream)
            self._lost(stream, ErrorCode.WORKER_FAILED, "the listen model sent a line that is not JSON")
            return
        if stream is self.stream:  # it ended by itself: the next audio opens another
            self.stream = None
            self._next_offset()

    def _placed(self, ev: dict[str, Any], offset_ms: float, base: int) -> dict[str, Any]:
        if isinstance(n := ev.get("utterance"), int):
            ev["utterance"] = n = n + base
            self.utterances = max(self.utterances, n)
        if offset_ms:
            for key in _POSITIONS:
                if isinstance(v := ev.get(key), int | float):
                    ev[key] = v + offset_ms
        return ev

    def _lost(self, stream: Stream, code: int, message: str) -> None:
        """A stream failed: reported when it is the one listening (the next audio opens another)."""
        if stream is not self.stream:
            return
        log.warning("listen stream of %s lost: %s", self.head.request_id or "a session", message)
        self.stream = None
        self._next_offset()
        self.on_lost(code, message)

    def _next_offset(self, room: int = 0) -> None:
        fed = self.fed_ms if self._ms_per_byte else (perf_counter() - self._t_open) * 1000 if self._t_open else 0.0
        self.offset_ms += fed
        self.fed_ms, self._t_open = 0.0, 0.0
        self.utterances += room


def _ms_per_byte(params: dict[str, Param]) -> float:
    """Milliseconds of audio per input byte (pcm16); 0.0 for Opus (packets vary)."""
    if str(params.get("format", "pcm16")) != "pcm16":
        return 0.0
    rate, channels = int(params.get("rate", 16000)), int(params.get("channels", 1))  # type: ignore[arg-type]
    return 1000.0 / (2 * channels * rate)
