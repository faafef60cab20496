"""The native realtime protocol (docs/realtime.md, "The voice session"): binary messages are the
user's audio in and the agent's audio out, raw; text messages are small JSON events.

Client -> server:
    {"type": "session.update", "session": {<settings>}}      input format and rate, VAD, voice, ...
    {"type": "input.commit"} / {"type": "input.clear"}        end pending speech now / drop it
    {"type": "text", "text": "...", "respond": true}          a user turn typed, not spoken
    {"type": "response.create"} / {"type": "response.cancel"}
    {"type": "playout", "response": "resp_3", "played_ms": 1840}   how much of its audio was played
    {"type": "truncate", "item": "item_4", "audio_ms": 1840}       the agent item was heard up to there
    {"type": "item.delete", "item": "item_2"}
Server -> client: session.ready, session.updated, speech_started, speech_stopped, transcript,
transcript.failed, response.started, (binary audio), response.text, response.done, turn.timing,
truncated, item.deleted, error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec

from casola.realtime.errors import SessionFault, wire_error
from casola.realtime.history import Item
from casola.realtime.settings import VAD_KEYS
from casola.realtime.turn import PCM_RATE, Response
from casola.wire import Buffer

if TYPE_CHECKING:
    from casola.realtime.dialect import Session

__all__ = ["NativeDialect"]

_decode = msgspec.json.Decoder().decode
# session.update's names -> the settings' (SessionSettings)
_SETTINGS = {"format": "input_format", "rate": "input_rate", "channels": "input_channels"}
# ... and back: the session's names for what it refuses -> the fields this protocol's client sent
_FIELD_OF: Final = (
    {v: f"input_audio.{k}" for k, v in _SETTINGS.items()}
    | {k: f"turn_detection.{k}" for k in (*VAD_KEYS, "respond", "interrupt")}
    | {"server_vad": "turn_detection.type", "item_id": "item"}
)


class NativeDialect:
    def __init__(self, session: Session) -> None:
        self.s = session

    # -- in ----------------------------------------------------------------------------------------

    def on_binary(self, data: memoryview) -> None:
        self.s.audio(data)

    def on_text(self, data: bytes) -> None:
        try:
            ev = _decode(data)
        except msgspec.DecodeError as exc:
            raise SessionFault(f"a text message must be a JSON object: {exc}") from None
        if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
            raise SessionFault('a text message is a JSON object with a "type"', param="type")
        kind = ev["type"]
        handler = _IN.get(kind)
        if handler is None:
            raise SessionFault(f"unknown event type {kind!r}", param="type")
        try:
            handler(self, ev)
        except SessionFault as exc:
            field = _FIELD_OF.get(exc.param, exc.param)
            message = exc.message.replace(exc.param, field, 1) if field != exc.param else exc.message
            self.error(message, exc.code, field, kind=kind)

    def _update(self, ev: dict[str, Any]) -> None:
        session = ev.get("session")
        if not isinstance(session, dict):
            raise SessionFault('session.update carries {"session": {...}}', param="session")
        changes: dict[str, Any] = {}
        for key, value in session.items():
            if key == "input_audio" and isinstance(value, dict):
                changes |= {_SETTINGS.get(str(k), str(k)): v for k, v in value.items()}
            elif key == "turn_detection" and isinstance(value, dict):
                for k, v in value.items():
                    if k == "type":
                        if v not in ("server_vad", "none"):
                            raise SessionFault("turn_detection.type is server_vad or none", param="turn_detection.type")
                        changes["server_vad"] = v == "server_vad"
                    else:
                        changes[k] = v
            else:
                changes[key] = value
        self.s.configure(changes)

    def _text(self, ev: dict[str, Any]) -> None:
        text = ev.get("text")
        if not isinstance(text, str):
            raise SessionFault('"text" is the user\'s words', param="text")
        self.s.add_text(text, "user", respond=ev.get("respond", True) is not False)

    def _playout(self, ev: dict[str, Any]) -> None:
        ms = ev.get("played_ms")
        if isinstance(ms, bool) or not isinstance(ms, int | float):
            raise SessionFault("played_ms is a number of milliseconds", param="played_ms")
        self.s.playout(str(ev.get("response", "")), ms)

    def _truncate(self, ev: dict[str, Any]) -> None:
        ms = ev.get("audio_ms")
        if isinstance(ms, bool) or not isinstance(ms, int | float):
            raise SessionFault("audio_ms is a number of milliseconds", param="audio_ms")
        self.s.truncate(str(ev.get("item", "")), ms)

    # -- out ----------------------------------------------------------------------------------------

    def opened(self) -> None:
        self.s.send_text({"type": "session.ready", "session": self._described()})

    def configured(self) -> None:
        self.s.send_text({"type": "session.updated", "session": self._described()})

    def _described(self) -> dict[str, Any]:
        return {"id": self.s.session_id, "workflow": self.s.workflow, **self.s.settings.describe(),
                "output_audio": {"format": "pcm16", "rate": PCM_RATE, "channels": 1}}  # fmt: skip

    def speech_started(self, utterance: int, audio_ms: float, item_id: str) -> None:
        self.s.send_text({"type": "speech_started", "utterance": utterance, "audio_ms": audio_ms, "item": item_id})

    def speech_stopped(self, utterance: int, audio_ms: float, item_id: str) -> None:
        self.s.send_text({"type": "speech_stopped", "utterance": utterance, "audio_ms": audio_ms, "item": item_id})

    def user_item(self, item: Item, utterance: int) -> None:
        self.s.send_text({"type": "transcript", "item": item.id, "utterance": utterance, "role": item.role,
                          "text": item.text})  # fmt: skip

    def transcription_failed(self, item_id: str, utterance: int, message: str) -> None:
        self.s.send_text({"type": "transcript.failed", "item": item_id, "utterance": utterance, "message": message})

    def response_started(self, resp: Response) -> None:
        self.s.send_text({"type": "response.started", "response": resp.id, "item": resp.item.id})

    def response_audio(self, resp: Response, chunk: Buffer) -> None:
        self.s.send_audio(chunk)

    def response_text(self, resp: Response, text: str) -> None:
        self.s.send_text({"type": "response.text", "response": resp.id, "text": text})

    def response_done(self, resp: Response) -> None:
        ev: dict[str, Any] = {"type": "response.done", "response": resp.id, "item": resp.item.id,
                              "status": resp.status, "text": resp.item.heard(),
                              "audio_ms": round(resp.audio_ms, 1)}  # fmt: skip
        if resp.reason:
            ev["reason"] = resp.reason
        if resp.error is not None:
            err = resp.error
            ev["error"] = wire_error(err.code, err.message, err.retry_after_ms, err.param)
        self.s.send_text(ev)

    def turn_timing(self, resp: Response, report: dict[str, Any]) -> None:
        self.s.send_text({"type": "turn.timing", "response": resp.id, **report})

    def truncated(self, item: Item, audio_end_ms: float) -> None:
        self.s.send_text({"type": "truncated", "item": item.id, "audio_ms": audio_end_ms, "text": item.heard()})

    def deleted(self, item_id: str) -> None:
        self.s.send_text({"type": "item.deleted", "item": item_id})

    def error(self, message: str, code: str, param: str = "", event_id: str = "", kind: str = "") -> None:
        err = {"message": message, "type": "invalid_request_error", "code": code, "param": param or None}
        self.s.send_text({"type": "error", "error": err, "event": kind or None})


_IN: dict[str, Callable[[NativeDialect, dict[str, Any]], object]] = {
    "session.update": NativeDialect._update,
    "input.commit": lambda d, ev: d.s.commit(),
    "input.clear": lambda d, ev: d.s.clear(),
    "text": NativeDialect._text,
    "response.create": lambda d, ev: d.s.respond(),
    "response.cancel": lambda d, ev: d.s.cancel(),
    "playout": NativeDialect._playout,
    "truncate": NativeDialect._truncate,
    "item.delete": lambda d, ev: d.s.delete(str(ev.get("item", ""))),
}
