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
        self.door, self.head = door, head
        self.on_event, self.on_lost = on_event, on_lost
        self.stream: Stream | None = None
        self.reader: asyncio.Task[None] | None = None
        self.offset_ms = 0.0  # audio given to the streams before this one
        self.fed_ms = 0.0  # audio given to this one (pcm16; Opus: its packets' wall-clock span)
        self._t_open = 0.0
        self._ms_per_byte = _ms_per_byte(head.params)

    def feed(self, audio: Buffer) -> None:
        """The next piece of the session's audio (raises nothing: a failed stream is reported)."""
        stream = self.stream or self._open()
        if stream is None:
            return
        try:
            stream.send(audio)
        except ConnectionLost as exc:
            self._lost(ErrorCode.SHUTTING_DOWN, f"the queue node link is gone ({exc})")
            return
        self.fed_ms += len(audio) * self._ms_per_byte if self._ms_per_byte else 0.0

    def end(self) -> None:
        """The session's input ended: the worker flushes pending speech and finishes."""
        if self.stream is not None:
            self.stream.end_input()

    def close(self) -> None:
        """Stop listening now (the session is over, or its input format changed): CANCEL."""
        stream, self.stream = self.stream, None
        if stream is not None:
            self.door.cancel(stream)
        self._next_offset()
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None

    def _open(self) -> Stream | None:
        try:
            self.stream = self.door.open(self.head, b"", end=False)
        except (RequestFailed, ConnectionLost) as exc:
            code = exc.code if isinstance(exc, RequestFailed) else ErrorCode.SHUTTING_DOWN
            self.on_lost(code, f"the listen stream could not open: {exc}")
            return None
        self._t_open = perf_counter()
        self.fed_ms = 0.0
        self.reader = asyncio.ensure_future(self._read(self.stream))
        return self.stream

    async def _read(self, stream: Stream) -> None:
        buf = b""
        try:
            async for chunk in stream:
                buf = buf + bytes(chunk) if buf else bytes(chunk)
                *lines, buf = buf.split(b"\n")
                now = perf_counter()
                for line in lines:
                    if line.strip():
                        self.on_event(self._placed(_decode(line)), now)
        except RequestFailed as exc:
            if stream is self.stream and exc.code != ErrorCode.CANCELLED:
                self._lost(exc.code, exc.message)
            return
        except ConnectionLost as exc:
            if stream is self.stream:
                self._lost(ErrorCode.SHUTTING_DOWN, str(exc))
            return
        except msgspec.DecodeError as exc:
            log.warning("listen model %s sent a line that is not JSON: %s", self.head.model, exc)
            if stream is self.stream:
                self.door.cancel(stream)
                self._lost(ErrorCode.WORKER_FAILED, "the listen model sent a line that is not JSON")
            return
        if stream is self.stream:  # it ended by itself: the next audio opens another
            self.stream = None
            self._next_offset()

    def _placed(self, ev: dict[str, Any]) -> dict[str, Any]:
        if self.offset_ms:
            for key in _POSITIONS:
                if isinstance(v := ev.get(key), int | float):
                    ev[key] = v + self.offset_ms
        return ev

    def _lost(self, code: int, message: str) -> None:
        log.warning("listen stream of %s lost: %s", self.head.request_id or "a session", message)
        self.stream = None
        self._next_offset()
        self.on_lost(code, message)

    def _next_offset(self) -> None:
        fed = self.fed_ms if self._ms_per_byte else (perf_counter() - self._t_open) * 1000 if self._t_open else 0.0
        self.offset_ms += fed
        self.fed_ms, self._t_open = 0.0, 0.0


def _ms_per_byte(params: dict[str, Param]) -> float:
    """Milliseconds of audio per input byte (pcm16); 0.0 for Opus (packets vary)."""
    if str(params.get("format", "pcm16")) != "pcm16":
        return 0.0
    rate, channels = int(params.get("rate", 16000)), int(params.get("channels", 1))  # type: ignore[arg-type]
    return 1000.0 / (2 * channels * rate)
