"""OpenAI Realtime's events for a voice session (`GET /openai/v1/realtime?model=NAME`): the subset of
the beta protocol ("OpenAI-Beta: realtime=v1") a client written for OpenAI's API needs, so that it
works with only its URL changed. Every message is JSON text; audio is base64 in it, PCM16 mono 24 kHz
both ways (OpenAI's `pcm16`). Each server event has a unique `event_id`; an error names the client
event that caused it (`error.event_id`), and the session goes on after it.

Client events: session.update (input/output_audio_format pcm16; turn_detection server_vad with
threshold, prefix_padding_ms, silence_duration_ms, create_response, interrupt_response, or null: the
client commits; instructions; voice; input_audio_transcription.language; modalities with audio;
tools []), input_audio_buffer.append / .commit / .clear, conversation.item.create (a message of role
user, input_text, or assistant, text), conversation.item.truncate / .delete, response.create /
.cancel. Without turn detection, input_audio_buffer.committed comes at once and a response.create
sent right after the commit waits for its transcript. Server events: session.created / .updated,
input_audio_buffer.speech_started / .speech_stopped / .committed / .cleared, conversation.item.created
/ .truncated / .deleted, conversation.item.input_audio_transcription.completed / .failed,
response.created, response.output_item.added / .done, response.content_part.added / .done,
response.audio.delta / .done, response.audio_transcript.delta / .done (response.text.* for a workflow
that ends in text), response.done, error; and casola's own `casola.turn.timing` {response_id,
vad_tail_ms, listen_ms, asr_ms, llm_first_sentence_ms, tts_first_audio_ms, voice_to_voice_ms or
text_to_voice_ms, platform_ms, complete} after a response that spoke (casola.realtime.timing), which
OpenAI's clients ignore as an unknown type.

Accepted and ignored (the workflow decides them): session temperature, max_response_output_tokens,
tool_choice, input_audio_noise_reduction, speed, tracing, model, input_audio_transcription null /
.model / .prompt (transcription stays on: it is how the agent hears); response.create's modalities,
metadata, temperature, max_output_tokens.

NOT covered (refused with an error event unless said otherwise): function-calling tools configured by
the client (a workflow's tools run server-side), text-only modalities, g711 audio, semantic_vad,
response.create overrides (instructions, tools, input, conversation "none": out-of-band responses), a
response with nothing to answer (the last item must be the user's), item types other than message
(function_call_output, ...), system messages (use instructions), audio content in a created item,
previous_item_id other than the last item, client-chosen item ids (ignored), conversation.item.retrieve,
usage (always null), and the `openai-insecure-api-key` subprotocol auth (browsers use the ingress's
session tokens); the GA protocol's session shape (type, audio.input / .output) and its renamed events
(response.output_audio.*). A response.create while one is in progress is refused, as OpenAI does.
"""

from __future__ import annotations

import binascii
import itertools
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import msgspec

from casola.realtime.errors import SessionFault
from casola.realtime.history import Item
from casola.realtime.turn import PCM_RATE, Response
from casola.wire import Buffer, error_name

if TYPE_CHECKING:
    from casola.realtime.dialect import Session


__all__ = ["OpenAIDialect"]

_decode = msgspec.json.Decoder().decode
# The listen model's voice-activity defaults (workers/listen.py), reported when nothing overrides them.
_VAD_DEFAULTS: Final = {"threshold": 0.5, "preroll_ms": 300, "silence_ms": 500}
# turn_detection's names -> the settings'
_TURNS: Final = {"threshold": "threshold", "prefix_padding_ms": "preroll_ms", "silence_duration_ms": "silence_ms",
                 "create_response": "respond", "interrupt_response": "interrupt"}  # fmt: skip
_PARAMS: Final = {v: f"session.turn_detection.{k}" for k, v in _TURNS.items()} | {
    "instructions": "session.instructions", "voice": "session.voice",
    "language": "session.input_audio_transcription.language"}  # fmt: skip
_IGNORED: Final = frozenset({"temperature", "max_response_output_tokens", "tool_choice", "input_audio_noise_reduction",
                             "speed", "tracing", "model", "object", "id", "expires_at", "client_secret",
                             "include"})  # fmt: skip
_RESPONSE_IGNORED: Final = frozenset({"modalities", "metadata", "temperature", "max_output_tokens", "voice",
                                      "max_response_output_tokens", "output_audio_format", "tool_choice"})  # fmt: skip
_CODES: Final = {"invalid_request_error": "invalid_value",
                 "input_audio_buffer_empty": "input_audio_buffer_commit_empty"}  # fmt: skip
_SERVER_CODES: Final = frozenset({"listen_interrupted", "shutting_down"})
_PCM16_IN: Final = {"input_format": "pcm16", "input_rate": PCM_RATE, "input_channels": 1}  # OpenAI's pcm16


def _fault(message: str, param: str, code: str = "invalid_value") -> SessionFault:
    return SessionFault(message, code, param)


class OpenAIDialect:
    def __init__(self, session: Session) -> None:
        self.s = session
        self._ids = itertools.count(1)
        self._prefix = "event_" + secrets.token_hex(4)
        self._said: dict[str, list[str]] = {}  # response id -> its transcript deltas
        self._committed: deque[str] = deque()  # item ids given to manual commits still being transcribed
        self._typed = False  # inside add_text: the user item is the client's, not a transcript
        self._deferred: str | None = None  # a response.create waiting for a commit's transcript: its event_id

    # -- in ----------------------------------------------------------------------------------------

    def on_binary(self, data: memoryview) -> None:
        raise SessionFault("OpenAI's protocol has no binary messages: send input_audio_buffer.append (base64)")

    def on_text(self, data: bytes) -> None:
        try:
            ev = _decode(data)
        except msgspec.DecodeError as exc:
            raise _fault(f"the message is not JSON: {exc}", "", "invalid_json") from None
        if not isinstance(ev, dict):
            raise _fault("a client event is a JSON object", "", "invalid_json")
        client = _event_id(ev)
        kind = ev.get("type")
        try:
            if not isinstance(kind, str):
                raise _fault('a client event has a "type"', "type", "missing_required_parameter")
            handler = _IN.get(kind)
            if handler is None:
                raise _fault(f"Invalid value: {kind!r} is not a client event type this server supports", "type")
            handler(self, ev)
        except SessionFault as exc:
            self.error(exc.message, exc.code, exc.param, client, kind if isinstance(kind, str) else "")

    def _update(self, ev: dict[str, Any]) -> None:
        session = ev.get("session")
        if not isinstance(session, dict):
            raise _fault('session.update carries {"session": {...}}', "session", "missing_required_parameter")
        changes: dict[str, Any] = {}
        for key, value in session.items():
            field = _SESSION.get(key)
            if field is not None:
                changes |= field(self, value)
            elif key not in _IGNORED:
                raise _fault(f"session.{key} is not supported here", f"session.{key}", "unknown_parameter")
        try:
            self.s.configure(changes)
        except SessionFault as exc:  # named as the client named it
            param = _PARAMS.get(exc.param, exc.param)
            message = exc.message.replace(exc.param, param.rpartition(".")[2], 1) if exc.param else exc.message
            raise _fault(message, param) from None

    def _modalities(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, list) or (self._speaks and "audio" not in value):
            raise _fault("modalities must include audio: text-only sessions are not supported", "session.modalities")
        return {}

    def _turn_detection(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {"server_vad": False}
        if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
            raise _fault("turn_detection is null or of type server_vad", "session.turn_detection.type")
        changes: dict[str, Any] = {"server_vad": True}
        for key, v in value.items():
            if key in _TURNS:
                changes[_TURNS[key]] = v
            elif key != "type" and v is not None:
                raise _fault(f"turn_detection.{key} is not supported", f"session.turn_detection.{key}",
                             "unknown_parameter")  # fmt: skip
        return changes

    def _transcription(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {}  # transcription stays on: it is how the agent hears
        if not isinstance(value, dict):
            raise _fault("input_audio_transcription is an object or null", "session.input_audio_transcription")
        return {"language": value["language"] or ""} if "language" in value else {}

    def _tools(self, value: Any) -> dict[str, Any]:
        if value:
            raise _fault("client-defined tools are not supported: the workflow's tools run on the server",
                         "session.tools")  # fmt: skip
        return {}

    def _append(self, ev: dict[str, Any]) -> None:
        audio = ev.get("audio")
        if not isinstance(audio, str):
            raise _fault('append carries "audio": base64 PCM16', "audio", "missing_required_parameter")
        try:
            pcm = binascii.a2b_base64(audio, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise _fault(f"audio is not valid base64: {exc}", "audio") from None
        self.s.audio(pcm)

    def _commit(self, ev: dict[str, Any]) -> None:
        if self.s.settings.server_vad:
            self.s.commit()  # speech pending ends now: speech_stopped and committed follow
            return
        previous = self._last_item()
        item_id = self.s.commit()  # the id of the user item its transcript becomes (user_item below)
        self._committed.append(item_id)
        self._send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)

    def _clear(self, ev: dict[str, Any]) -> None:
        self.s.clear()
        self._send("input_audio_buffer.cleared")

    def _create_item(self, ev: dict[str, Any]) -> None:
        item = ev.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise _fault("only message items are supported", "item.type")
        role = item.get("role")
        if role not in ("user", "assistant"):
            raise _fault(f"role {role!r} is not supported: user or assistant (system: instructions)", "item.role")
        if ev.get("previous_item_id") not in (None, self._last_item()):
            raise _fault("items are added at the end of the conversation only", "previous_item_id")
        self._typed = True
        try:
            self.s.add_text(_text_of(item.get("content"), role), role, respond=False)
        finally:
            self._typed = False

    def _respond(self, ev: dict[str, Any]) -> None:
        overrides = ev.get("response") or {}
        if not isinstance(overrides, dict):
            raise _fault("response is an object", "response")
        for key, value in overrides.items():
            if key not in _RESPONSE_IGNORED and not (key == "conversation" and value == "auto") and value:
                raise _fault(f"response.{key} is not supported: responses answer the conversation as configured",
                             f"response.{key}", "unknown_parameter")  # fmt: skip
        if (self.s.response is not None and self.s.response.live) or self._deferred is not None:
            raise _fault("Conversation already has an active response", "", "conversation_already_has_active_response")
        if self._committed:  # a commit is still being transcribed: answer once its item is in
            self._deferred = _event_id(ev)
            return
        self.s.respond()

    def _answer_deferred(self) -> None:
        event_id, self._deferred = self._deferred or "", None
        try:
            self.s.respond()
        except SessionFault as exc:
            self.error(exc.message, exc.code, exc.param, event_id, "response.create")

    def _cancel(self, ev: dict[str, Any]) -> None:
        live = self.s.response if self.s.response is not None and self.s.response.live else None
        wanted = ev.get("response_id")
        if live is None and self._deferred is not None:  # not started yet: it will not be
            self._deferred = None
            return
        if live is None or wanted not in (None, "", live.id):
            raise _fault("Cancellation failed: no active response found", "", "response_cancel_not_active")
        self.s.cancel()

    def _truncate(self, ev: dict[str, Any]) -> None:
        ms = ev.get("audio_end_ms")
        if isinstance(ms, bool) or not isinstance(ms, int | float):
            raise _fault("audio_end_ms is a number of milliseconds", "audio_end_ms", "missing_required_parameter")
        if ev.get("content_index", 0) != 0:
            raise _fault("an agent item has one content part: content_index 0", "content_index")
        self.s.truncate(str(ev.get("item_id", "")), ms)

    # -- out ----------------------------------------------------------------------------------------

    def _send(self, kind: str, **fields: Any) -> None:
        self.s.send_text({"type": kind, "event_id": f"{self._prefix}{next(self._ids):05d}", **fields})

    def opened(self) -> None:
        named = self.s.call.meta.params
        if "rate" not in named and "input_rate" not in named:  # OpenAI's pcm16 is 24 kHz
            self.s.settings.apply({"input_rate": PCM_RATE})
        self._send("session.created", session=self._described())

    def configured(self) -> None:
        self._send("session.updated", session=self._described())

    def _described(self) -> dict[str, Any]:
        st, agent = self.s.settings, self.s.agent
        return {"id": self.s.session_id, "object": "realtime.session", "model": self.s.workflow,
                "modalities": ["audio", "text"] if self._speaks else ["text"],
                "instructions": st.instructions, "voice": st.voice or agent.realtime.voice or None,
                "input_audio_format": st.input_format, "output_audio_format": "pcm16",
                "input_audio_transcription": {"model": agent.realtime.listen, "language": st.language or None},
                "turn_detection": self._turns(), "tools": [], "tool_choice": "none",
                "max_response_output_tokens": "inf"}  # fmt: skip

    def _turns(self) -> dict[str, Any] | None:
        st = self.s.settings
        if not st.server_vad:
            return None
        vad = {k: st.vad.get(k, self.s.agent.realtime.params.get(k, v)) for k, v in _VAD_DEFAULTS.items()}
        return {"type": "server_vad", "threshold": vad["threshold"], "prefix_padding_ms": vad["preroll_ms"],
                "silence_duration_ms": vad["silence_ms"], "create_response": st.respond,
                "interrupt_response": st.interrupt}  # fmt: skip

    def speech_started(self, utterance: int, audio_ms: float, item_id: str) -> None:
        self._send("input_audio_buffer.speech_started", audio_start_ms=round(audio_ms), item_id=item_id)

    def speech_stopped(self, utterance: int, audio_ms: float, item_id: str) -> None:
        self._send("input_audio_buffer.speech_stopped", audio_end_ms=round(audio_ms), item_id=item_id)
        self._send("input_audio_buffer.committed", previous_item_id=self._last_item(), item_id=item_id)

    def user_item(self, item: Item, utterance: int) -> None:
        spoken = not self._typed
        if utterance == 0 and spoken and item.id in self._committed:
            self._committed.remove(item.id)  # the transcript its commit announced (see _commit)
        if not spoken:
            part = {"type": "input_text" if item.role == "user" else "text", "text": item.text}
        else:
            part = {"type": "input_audio", "transcript": item.text}
        body = {"id": item.id, "object": "realtime.item", "type": "message", "status": "completed",
                "role": item.role, "content": [part]}  # fmt: skip
        self._send("conversation.item.created", previous_item_id=self._previous(item.id), item=body)
        if spoken:
            self._send("conversation.item.input_audio_transcription.completed", item_id=item.id, content_index=0,
                       transcript=item.text)  # fmt: skip
        if spoken and self._deferred is not None and not self._committed:
            self._answer_deferred()

    def transcription_failed(self, item_id: str, utterance: int, message: str) -> None:
        if utterance == 0 and item_id in self._committed:
            self._committed.remove(item_id)
        err = {"type": "transcription_error", "code": "transcription_failed", "message": message, "param": None}
        self._send("conversation.item.input_audio_transcription.failed", item_id=item_id, content_index=0, error=err)
        if self._deferred is not None and not self._committed:
            self._answer_deferred()

    def response_started(self, resp: Response) -> None:
        self._said[resp.id] = []
        self._send("response.created", response=self._response(resp, "in_progress", []))
        item = self._item(resp, "in_progress", [])
        self._send("response.output_item.added", response_id=resp.id, output_index=0, item=item)
        self._send("conversation.item.created", previous_item_id=self._previous(resp.item.id), item=item)
        self._send("response.content_part.added", **self._where(resp), part=self._part(""))

    def response_audio(self, resp: Response, chunk: Buffer) -> None:
        delta = binascii.b2a_base64(chunk, newline=False).decode("ascii")
        self._send("response.audio.delta", **self._where(resp), delta=delta)

    def response_text(self, resp: Response, text: str) -> None:
        said = self._said.setdefault(resp.id, [])
        delta = f" {text}" if said else text
        said.append(delta)
        kind = "response.audio_transcript.delta" if self._speaks else "response.text.delta"
        self._send(kind, **self._where(resp), delta=delta)

    def response_done(self, resp: Response) -> None:
        said, where = "".join(self._said.pop(resp.id, [])), self._where(resp)
        if self._speaks:
            self._send("response.audio.done", **where)
            self._send("response.audio_transcript.done", **where, transcript=said)
        else:
            self._send("response.text.done", **where, text=said)
        self._send("response.content_part.done", **where, part=self._part(said))
        item = self._item(resp, "completed" if resp.status == "completed" else "incomplete", [self._part(said)])
        self._send("response.output_item.done", response_id=resp.id, output_index=0, item=item)
        self._send("response.done", response=self._response(resp, resp.status, [item]))

    def turn_timing(self, resp: Response, report: dict[str, Any]) -> None:
        self._send("casola.turn.timing", response_id=resp.id, **report)

    def truncated(self, item: Item, audio_end_ms: float) -> None:
        self._send("conversation.item.truncated", item_id=item.id, content_index=0, audio_end_ms=round(audio_end_ms))

    def deleted(self, item_id: str) -> None:
        self._send("conversation.item.deleted", item_id=item_id)

    def error(self, message: str, code: str, param: str = "", event_id: str = "", kind: str = "") -> None:
        err = {"type": "server_error" if code in _SERVER_CODES else "invalid_request_error",
               "code": _CODES.get(code, code), "message": message, "param": param or None,
               "event_id": event_id or None}  # fmt: skip
        self._send("error", error=err)

    # -- shapes -------------------------------------------------------------------------------------

    @property
    def _speaks(self) -> bool:
        return bool(self.s.agent.speak_step)

    def _where(self, resp: Response) -> dict[str, Any]:
        return {"response_id": resp.id, "item_id": resp.item.id, "output_index": 0, "content_index": 0}

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "audio", "transcript": text} if self._speaks else {"type": "text", "text": text}

    def _item(self, resp: Response, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": resp.item.id, "object": "realtime.item", "type": "message", "status": status,
                "role": "assistant", "content": content}  # fmt: skip

    def _response(self, resp: Response, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        details: dict[str, Any] | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": "turn_detected" if resp.reason == "turn_detected"
                       else "client_cancelled"}  # fmt: skip
        elif status == "failed" and resp.error is not None:
            details = {"type": "failed", "error": {"type": "server_error", "code": error_name(resp.error.code).lower(),
                                                   "message": resp.error.message}}  # fmt: skip
        return {"id": resp.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output, "modalities": ["audio", "text"] if self._speaks else ["text"],
                "output_audio_format": "pcm16", "usage": None}  # fmt: skip

    def _last_item(self) -> str | None:
        items = self.s.history.items
        return items[-1].id if items else None

    def _previous(self, item_id: str) -> str | None:
        ids = [i.id for i in self.s.history.items]
        at = ids.index(item_id) if item_id in ids else len(ids)
        return ids[at - 1] if at > 0 else None


def _pcm16(key: str, value: Any) -> dict[str, Any]:
    if value != "pcm16":
        raise _fault(f"{key} {value!r} is not supported: pcm16 only (PCM16 mono 24 kHz)", f"session.{key}")
    return {}


def _event_id(ev: dict[str, Any]) -> str:
    """The client event's own id ("" when it gave none), which an error about it names."""
    value = ev.get("event_id")
    return value if isinstance(value, str) else ""


def _text_of(content: Any, role: str) -> str:
    """A created message's words: its text parts (input_text for the user's, text for the agent's)."""
    want = "input_text" if role == "user" else "text"
    if not isinstance(content, list) or not content:
        raise _fault("a message's content is a list of parts", "item.content", "missing_required_parameter")
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in (want, "input_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else part
            raise _fault(f"content part {kind!r} is not supported: {want} only", "item.content")
        if not isinstance(part.get("text"), str):
            raise _fault("a text part carries a string", "item.content.text", "missing_required_parameter")
        texts.append(part["text"])
    return " ".join(texts)


_SESSION = {
    "input_audio_format": lambda d, v: _pcm16("input_audio_format", v) | _PCM16_IN,
    "output_audio_format": lambda d, v: _pcm16("output_audio_format", v),
    "modalities": OpenAIDialect._modalities,
    "turn_detection": OpenAIDialect._turn_detection,
    "instructions": lambda d, v: {"instructions": "" if v is None else v},
    "voice": lambda d, v: {"voice": "" if v is None else v},
    "input_audio_transcription": OpenAIDialect._transcription,
    "tools": OpenAIDialect._tools,
}
_IN = {
    "session.update": OpenAIDialect._update,
    "input_audio_buffer.append": OpenAIDialect._append,
    "input_audio_buffer.commit": OpenAIDialect._commit,
    "input_audio_buffer.clear": OpenAIDialect._clear,
    "conversation.item.create": OpenAIDialect._create_item,
    "conversation.item.truncate": OpenAIDialect._truncate,
    "conversation.item.delete": lambda d, ev: d.s.delete(str(ev.get("item_id", ""))),
    "response.create": OpenAIDialect._respond,
    "response.cancel": OpenAIDialect._cancel,
}
