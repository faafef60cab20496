"""One realtime voice session: a conversation on one long-lived stream (docs/realtime.md).

It lives in the queue node's process, as the request the engine's worker for its workflow serves, so
its state (settings, conversation, the response in progress) outlives any worker it uses:

- audio from the client goes on to a `listen` worker on one stream (casola.realtime.listener), whose
  speech_started / speech_stopped / transcript events come back as they happen;
- a transcript joins the conversation and starts a response (casola.realtime.turn): the workflow
  from its llm step on, with the conversation so far; its audio streams back as produced;
- speech_started while the agent answers (barge-in) stops the response in the same callback: its
  step requests are cancelled (each worker sees CANCEL) and nothing more of it is sent; the agent's
  item keeps what the client heard (its playout acknowledgements, else the time its audio had to
  play; `truncate` corrects it);
- a listen worker lost mid-session is replaced with the next audio, a failed turn is reported and
  the next one runs: neither closes the session. A drain of the node ends it with SHUTTING_DOWN
  (close 1012: reconnect) once the response in progress is done.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from time import perf_counter
from typing import Any

import msgspec

from casola.client import RequestFailed
from casola.flow.wav import wav_header
from casola.net.errors import ConnectionLost
from casola.realtime.agent import Agent
from casola.realtime.dialect import Dialect, Session
from casola.realtime.errors import SessionFault
from casola.realtime.framing import (
    CONTENT_TYPE,
    TAG_BINARY,
    FramingError,
    MessageReader,
    json_message,
    message,
)
from casola.realtime.history import Conversation, Item
from casola.realtime.listener import Listener
from casola.realtime.settings import SessionSettings
from casola.realtime.timing import TurnTiming
from casola.realtime.turn import PCM_RATE, Response
from casola.wire import Buffer, ErrorCode, RequestMeta
from casola.worker.call import HandlerError, WorkCall

__all__ = ["VoiceSession"]

log = logging.getLogger("casola.realtime")

_JSON = msgspec.json.Encoder()
_PLAYOUT_SLACK_S = 0.15  # an answer is still playing this long after its audio's span (network, jitter buffer)


class VoiceSession:
    def __init__(self, call: WorkCall, agent: Agent, dialect: str = "native") -> None:
        self.call, self.agent = call, agent
        self.workflow = agent.name
        self.session_id = "sess_" + secrets.token_hex(8)
        self.settings = SessionSettings.from_params(call.meta.params)
        self.history = Conversation(agent.realtime.max_items)
        self.listener = Listener(agent.door, self._listen_head(), self._heard, self._deaf)
        self.response: Response | None = None
        self.pending: dict[int, TurnTiming] = {}  # utterances stopped, their transcript not yet in
        self.items: dict[int, str] = {}  # utterance -> the id its user item gets
        self.buffer = bytearray()  # server VAD off: the audio since the last commit
        self.acked: tuple[str, float, float] = ("", 0.0, 0.0)  # the last playout ack: response, ms, when
        self.draining = False
        self.tasks: set[asyncio.Task[None]] = set()  # committed buffers being transcribed
        self._done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.dialect: Dialect = _dialect(dialect, self)

    # -- the stream ----------------------------------------------------------------------------------

    async def serve(self) -> None:
        """The session's whole life: until the client closes, the node drains, or the stream fails."""
        self.call.start(CONTENT_TYPE)
        self.dialect.opened()
        reader = asyncio.ensure_future(self._read())
        try:
            fault = await self._done
        finally:
            reader.cancel()
            self._close()
        if fault is not None:
            raise fault
        if not self.call.finished:
            self.call.end()

    def drain(self) -> None:
        """The node is draining: end with SHUTTING_DOWN once the response in progress is done."""
        self.draining = True
        if self.response is None or not self.response.live:
            self._end(HandlerError("the queue node is draining: reconnect", ErrorCode.SHUTTING_DOWN))

    async def _read(self) -> None:
        reader = MessageReader()
        try:
            async for chunk in self.call.chunks():
                for tag, body in reader.feed(chunk):
                    try:
                        if tag == TAG_BINARY:
                            self.dialect.on_binary(body)
                        else:
                            self.dialect.on_text(bytes(body))
                    except SessionFault as exc:
                        self.dialect.error(exc.message, exc.code, exc.param)
            self._end(None)  # the client closed
        except FramingError as exc:  # not messages: nothing further can be read
            self._end(HandlerError(f"the session's stream: {exc}", ErrorCode.BAD_REQUEST))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must end this session only, with an answer
            log.exception("realtime session %s failed", self.session_id)
            self._end(HandlerError(f"the session failed: {exc}", ErrorCode.INTERNAL))

    def _end(self, fault: BaseException | None) -> None:
        if not self._done.done():
            self._done.set_result(fault)

    def _close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.response is not None:
            self.response.stop("session_closed")
        self.listener.close()
        for reader in list(self.listener.readers):
            reader.cancel()

    # -- output ------------------------------------------------------------------------------------

    def send_text(self, event: dict[str, Any]) -> None:
        self.call.send(json_message(_JSON, event))

    def send_audio(self, chunk: Buffer) -> None:
        self.call.send(message(TAG_BINARY, chunk))

    # -- the session's operations (what a dialect calls) ----------------------------------------------

    def configure(self, changes: dict[str, Any]) -> None:
        """Raises SessionFault (nothing changed)."""
        if self.settings.apply(changes):
            self.listener.retune(self._listen_head())  # the next audio opens a stream with the new settings
        self.dialect.configured()

    def audio(self, pcm: Buffer) -> None:
        if not len(pcm):
            return
        if not self.settings.server_vad:
            limit = self.agent.realtime.max_buffer_ms * self._bytes_per_ms()
            if len(self.buffer) + len(pcm) > limit:
                raise SessionFault(f"the input buffer holds at most {self.agent.realtime.max_buffer_ms} ms: commit it",
                                   "input_audio_buffer_full")  # fmt: skip
            self.buffer += pcm
            return
        self.listener.feed(pcm)

    def commit(self) -> str:
        """Server VAD: speech pending is ended now. Off: the buffer is transcribed as one utterance;
        returns the id its user item will have ("" with server VAD)."""
        if self.settings.server_vad:
            self.listener.end()  # this stream flushes its pending speech and finishes; the next audio opens another
            return ""
        if not self.buffer:
            raise SessionFault("the input audio buffer is empty: nothing to commit", "input_audio_buffer_empty")
        if self.settings.input_format != "pcm16":
            raise SessionFault("commit without server VAD takes pcm16 input", param="input_format")
        audio, self.buffer = bytes(self.buffer), bytearray()
        item_id = self.history.new_id()
        task = asyncio.ensure_future(self._transcribe(audio, item_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return item_id

    def clear(self) -> None:
        """Audio not yet made an utterance is dropped."""
        self.buffer = bytearray()
        self.listener.close()

    def add_text(self, text: str, role: str = "user", respond: bool = False) -> Item:
        if role not in ("user", "assistant"):
            raise SessionFault(f"role must be user or assistant, not {role!r}", param="role")
        if not text.strip():
            raise SessionFault("the text is empty", param="text")
        item = self.history.add(role, text.strip())  # type: ignore[arg-type]
        self.dialect.user_item(item, 0)
        if respond:
            self.respond()
        return item

    def respond(self, timing: TurnTiming | None = None) -> Response:
        """Start a response to the conversation (one in progress is stopped first)."""
        if self.draining:
            raise SessionFault("the queue node is draining: no new response", "shutting_down")
        if not self.history.waiting_for_answer():
            raise SessionFault("the conversation has nothing to answer: its last item is not the user's",
                               "conversation_empty")  # fmt: skip
        if self.agent.first_step < 0:
            raise SessionFault(f"workflow {self.agent.name!r} has no llm step: it cannot hold a conversation")
        if self.response is not None and self.response.live:
            self._stop(self.response, "superseded")
        messages = self.history.messages()
        item = self.history.add("assistant")
        t = timing or TurnTiming()
        resp = Response(self.history.new_id("resp"), self.agent, self._turn_head(), item, t,
                        self._audio_out, self._text_out)  # fmt: skip
        self.response = resp
        self.dialect.response_started(resp)
        task = resp.start(messages, self.settings.instructions)
        task.add_done_callback(lambda _: self._finished(resp))
        return resp

    def cancel(self) -> Response | None:
        """Stop the response in progress (response.cancel); None: there was none."""
        resp = self.response
        if resp is None or not resp.live:
            return None
        self._stop(resp, "client_cancelled")
        return resp

    def playout(self, response_id: str, played_ms: float) -> None:
        """The client has played `played_ms` of the response's audio (a playout acknowledgement)."""
        if played_ms < 0:
            raise SessionFault("played_ms must be >= 0", param="played_ms")
        self.acked = (response_id, float(played_ms), perf_counter())

    def truncate(self, item_id: str, audio_end_ms: float) -> Item:
        try:
            item = self.history.truncate(item_id, audio_end_ms)
        except KeyError:
            raise SessionFault(f"no item {item_id!r} in the conversation", "item_not_found", "item_id") from None
        except ValueError as exc:
            raise SessionFault(str(exc), param="audio_end_ms") from None
        self.dialect.truncated(item, audio_end_ms)
        return item

    def delete(self, item_id: str) -> None:
        if not self.history.delete(item_id):
            raise SessionFault(f"no item {item_id!r} in the conversation", "item_not_found", "item_id")
        self.dialect.deleted(item_id)

    # -- what the listen stream hears --------------------------------------------------------------------

    def _heard(self, ev: dict[str, Any], t: float) -> None:
        kind, utt = ev.get("type"), int(ev.get("utterance", 0))
        if kind == "speech_started":
            self.items[utt] = item_id = self.history.new_id()
            resp = self.response
            barge = resp is not None and self.settings.interrupt and self._speaking(resp)
            self.dialect.speech_started(utt, ev.get("audio_ms", 0), item_id)
            if barge:  # in this same callback: no frame of the response can be sent after the event
                self._stop(resp, "turn_detected")  # type: ignore[arg-type]
        elif kind == "speech_stopped":
            tail = float(ev.get("at_ms", 0)) - float(ev.get("audio_ms", 0))
            self.pending[utt] = TurnTiming(vad_tail_ms=max(tail, 0.0), t_stopped=t)
            self.dialect.speech_stopped(utt, ev.get("audio_ms", 0), self.items.get(utt, ""))
        elif kind == "transcript":
            timing = self.pending.pop(utt, None) or TurnTiming(t_stopped=t)
            timing.t_transcript, timing.asr_ms = t, float(ev.get("asr_ms", 0.0))
            self._transcript(str(ev.get("text", "")), utt, timing)
        elif kind == "error":
            self.pending.pop(utt, None)
            self.dialect.transcription_failed(self.items.pop(utt, ""), utt, str(ev.get("message", "")))

    def _transcript(self, text: str, utt: int, timing: TurnTiming) -> None:
        item = self.history.add("user", text.strip(), self.items.pop(utt, ""))
        self.dialect.user_item(item, utt)
        if item.text and self.settings.respond and not self.draining:
            try:
                self.respond(timing)
            except SessionFault as exc:
                self.dialect.error(exc.message, exc.code, exc.param)

    def _deaf(self, code: int, message: str) -> None:
        """The listen stream failed; the next audio opens another (on a live worker)."""
        self.pending.clear()
        self.dialect.error(f"listening was interrupted ({message}); it resumes with the next audio",
                           "listen_interrupted")  # fmt: skip

    async def _transcribe(self, audio: bytes, item_id: str) -> None:
        """Server VAD off: one committed buffer, transcribed by the workflow's ASR model."""
        t = perf_counter()
        model = self.agent.asr_model
        meta = msgspec.structs.replace(self._turn_head(), model=model, content_type="audio/wav",
                                       params={"response_format": "text", **self._lang()})  # fmt: skip
        wav = wav_header(self.settings.input_rate, self.settings.input_channels, len(audio)) + audio
        try:
            stream = self.agent.door.open(meta, wav)
            text = (await stream.read()).decode(errors="replace")
        except (RequestFailed, ConnectionLost) as exc:
            self.dialect.transcription_failed(item_id, 0, str(exc))
            return
        log.debug("session %s: a committed buffer transcribed in %.1f ms", self.session_id, (perf_counter() - t) * 1000)
        self.dialect.user_item(self.history.add("user", text.strip(), item_id), 0)  # answered on response.create

    # -- responses -----------------------------------------------------------------------------------------

    def _speaking(self, resp: Response) -> bool:
        """The agent is answering: generating still, or its audio still playing at the client."""
        if resp.live:
            return True
        if not resp.t_audio:
            return False
        return self._played_ms(resp) < resp.audio_ms

    def _played_ms(self, resp: Response) -> float:
        """How much of the response's audio the client has played by now: its last acknowledgement
        and the time since, or (none) the time since its first audio was sent; at most all of it."""
        now = perf_counter()
        rid, ms, when = self.acked
        if rid == resp.id:
            played = ms + (now - when) * 1000
        elif resp.t_audio:
            played = (now - resp.t_audio - _PLAYOUT_SLACK_S) * 1000
        else:
            played = 0.0
        return min(max(played, 0.0), resp.audio_ms)

    def _stop(self, resp: Response, reason: str) -> None:
        heard = self._played_ms(resp)
        resp.stop(reason)
        if heard < resp.audio_ms:
            resp.item.played_ms = heard  # the history keeps what was heard
        self._finished(resp)

    def _finished(self, resp: Response) -> None:
        if resp.reported:
            return
        resp.reported = True
        self.dialect.response_done(resp)
        report = resp.timing.report(resp.run)
        self.agent.stats.observe(resp.status, report)
        if report:
            self.dialect.turn_timing(resp, report)
        if self.draining and resp is self.response:
            self.drain()

    def _audio_out(self, resp: Response, chunk: Buffer) -> None:
        if resp.live and resp is self.response:
            self.dialect.response_audio(resp, chunk)

    def _text_out(self, resp: Response, text: str) -> None:
        if resp.live and resp is self.response:
            self.dialect.response_text(resp, text)

    # -- heads --------------------------------------------------------------------------------------------

    def _listen_head(self) -> RequestMeta:
        params = self.settings.listen_params(self.agent.realtime.params)
        return msgspec.structs.replace(self.call.meta, model=self.agent.realtime.listen, deadline_ms=0,
                                       content_type="audio/pcm", params=params, trace=True)  # fmt: skip

    def _turn_head(self) -> RequestMeta:
        """A turn's head: the session's caller, no deadline but the workflow's, the speaking step
        asked for raw PCM (and the session's voice)."""
        params: dict[str, Any] = {}
        if speak := self.agent.speak_step:
            params[f"{speak}.response_format"] = "pcm"
            if voice := self.settings.voice or self.agent.realtime.voice:
                params[f"{speak}.voice"] = voice
        return msgspec.structs.replace(self.call.meta, deadline_ms=0, content_type="application/json",
                                       params=params, trace=True)  # fmt: skip

    def _lang(self) -> dict[str, Any]:
        return {"language": self.settings.language} if self.settings.language else {}

    def _bytes_per_ms(self) -> float:
        return 2 * self.settings.input_channels * self.settings.input_rate / 1000

    @property
    def output_rate(self) -> int:
        return PCM_RATE


def _dialect(name: str, session: Session) -> Dialect:
    if name == "openai":
        from casola.realtime.openai import OpenAIDialect

        return OpenAIDialect(session)
    from casola.realtime.native import NativeDialect

    return NativeDialect(session)
