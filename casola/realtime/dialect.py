"""A session's two ways of speaking to its client: the native protocol (casola.realtime.native) and
OpenAI's Realtime events (casola.realtime.openai). The session decides; a dialect words it.

`Dialect` reads the client's messages (a tagged text or binary payload) into the session's
operations and writes the session's happenings as the client's events. The session's operations
(`Session` below) are all a dialect may call: configure, audio, commit, clear, add text, respond,
cancel, playout acknowledgement, truncate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from casola.realtime.errors import SessionFault
from casola.wire import Buffer

if TYPE_CHECKING:
    from casola.realtime.agent import Agent
    from casola.realtime.history import Conversation, Item
    from casola.realtime.settings import SessionSettings
    from casola.realtime.turn import Response
    from casola.worker.call import WorkCall

__all__ = ["Dialect", "Session", "SessionFault"]


class Session(Protocol):
    """What a dialect may read and call of its session (casola.realtime.session.VoiceSession)."""

    settings: SessionSettings
    session_id: str
    workflow: str  # the workflow's name
    agent: Agent  # the workflow as sessions hold it: whether it speaks, its listen model and defaults
    history: Conversation  # the items in order
    response: Response | None  # the response in progress, if any
    call: WorkCall  # the REQUEST: the params the client named on connecting

    def configure(self, changes: dict[str, Any]) -> None: ...
    def audio(self, pcm: Buffer) -> None: ...
    def commit(self) -> str: ...
    def clear(self) -> None: ...
    def add_text(self, text: str, role: str = "user", respond: bool = False) -> Item: ...
    def respond(self) -> Response: ...
    def cancel(self) -> Response | None: ...
    def playout(self, response_id: str, played_ms: float) -> None: ...
    def truncate(self, item_id: str, audio_end_ms: float) -> Item: ...
    def delete(self, item_id: str) -> None: ...
    def send_text(self, event: dict[str, Any]) -> None: ...
    def send_audio(self, chunk: Buffer) -> None: ...


class Dialect(Protocol):
    def opened(self) -> None:
        """The session is ready (its settings are in `session.settings`)."""

    def on_text(self, data: bytes) -> None:
        """One text message (JSON) from the client. Raises SessionFault."""

    def on_binary(self, data: memoryview) -> None:
        """One binary message from the client. Raises SessionFault."""

    def configured(self) -> None: ...
    def speech_started(self, utterance: int, audio_ms: float, item_id: str) -> None: ...
    def speech_stopped(self, utterance: int, audio_ms: float, item_id: str) -> None: ...
    def user_item(self, item: Item, utterance: int) -> None:
        """A user item joined the conversation (a transcript, or text the client added)."""

    def transcription_failed(self, item_id: str, utterance: int, message: str) -> None: ...
    def response_started(self, resp: Response) -> None: ...
    def response_audio(self, resp: Response, chunk: Buffer) -> None: ...
    def response_text(self, resp: Response, text: str) -> None: ...
    def response_done(self, resp: Response) -> None: ...
    def turn_timing(self, resp: Response, report: dict[str, Any]) -> None: ...
    def truncated(self, item: Item, audio_end_ms: float) -> None: ...
    def deleted(self, item_id: str) -> None: ...
    def error(self, message: str, code: str, param: str = "", event_id: str = "", kind: str = "") -> None:
        """A refused client event (`kind`: its type), or a fault the session survived."""
