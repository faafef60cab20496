"""One answer of the agent (a response): the session's workflow run from its `llm` step on, its
input the conversation so far, its audio streamed to the client as produced.

The run is built as a workflow run is (casola.flow.pipeline), on the engine's front door, so every
step request is scheduled, filtered and timed like any other, and the last step (TTS) is asked for
raw PCM16 (`response_format = "pcm"`: 24 kHz mono, what OpenAI's Realtime API sends too). The
`sentences` step is tapped: each sentence is kept with the span of audio that speaks it (the
history cuts an interrupted answer there) and is sent as the transcript the moment its audio starts.

A response is fenced by its id: once `stop()` is called (barge-in, response.cancel, a newer
response) nothing more of it reaches the client, whatever its steps still deliver, and every step
request in flight is cancelled at once, so each worker sees CANCEL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from casola.flow.pipeline import build_pipeline
from casola.flow.run import Run, StepFailed
from casola.flow.spec import StepConfig
from casola.flow.stages import Given, Item, PerSentence, Source
from casola.flow.wav import WavFormatError
from casola.realtime.history import Item as HistoryItem
from casola.realtime.history import Spoken
from casola.realtime.timing import TurnTiming
from casola.wire import Buffer, ErrorCode, RequestMeta

if TYPE_CHECKING:
    from casola.realtime.agent import Agent

__all__ = ["PCM_RATE", "Response", "Status"]

log = logging.getLogger("casola.realtime")

PCM_RATE = 24000  # the TTS worker's `pcm` format: 24 kHz s16le mono
_MS_PER_BYTE = 1000 / (2 * PCM_RATE)
Status = Literal["in_progress", "completed", "cancelled", "failed"]
_encode = msgspec.json.Encoder().encode


class Response:
    def __init__(
        self,
        rid: str,
        agent: Agent,
        meta: RequestMeta,
        item: HistoryItem,
        timing: TurnTiming,
        on_audio: Callable[[Response, Buffer], None],
        on_text: Callable[[Response, str], None],
    ) -> None:
        """`meta`: the turn's head (the session's tenant, priority, filter policy, request id, and
        the per-step params); `item`: the agent item its words go into."""
        self.id, self.agent, self.meta, self.item, self.timing = rid, agent, meta, item, timing
        self.on_audio, self.on_text = on_audio, on_text
        self.status: Status = "in_progress"
        self.live = True  # False once stopped: nothing more of it is sent
        self.error: StepFailed | None = None
        self.run: Run | None = None
        self.task: asyncio.Task[None] | None = None
        self.reason = ""  # why it was stopped (turn_detected, client_cancelled, ...)
        self.t_audio = 0.0  # perf_counter() when its first audio was sent
        self.reported = False  # response.done (and its timing) went to the client: once only
        self._said: list[str] = []  # sentences as the splitter gave them
        self._spoken = 0  # sentences whose audio has started

    def start(self, messages: list[dict[str, Any]], system: str) -> asyncio.Task[None]:
        body: dict[str, Any] = {"messages": messages}
        if system:
            body["system"] = system
        self.task = asyncio.ensure_future(self._run(_encode(body)))
        return self.task

    def stop(self, reason: str) -> None:
        """Fence it off now: no more of it reaches the client, and its step requests are cancelled."""
        if not self.live:
            return
        self.live, self.reason = False, reason
        if self.status == "in_progress":
            self.status = "cancelled"
        if self.run is not None:
            self.run.cancel_all()  # CANCEL to every worker still working on it, in this call
        if self.task is not None and not self.task.done():
            self.task.cancel()

    @property
    def audio_ms(self) -> float:
        return self.item.audio_ms

    async def _run(self, body: bytes) -> None:
        agent = self.agent
        run = self.run = Run(agent.name, self.meta, agent.config.deadline_ms, agent.stages, agent.door)
        self.timing.t_start = run.t0
        src = build_pipeline(run, agent.config, agent.tools, Given("application/json", [body]), agent.first_step,
                             tap=self._tap)  # fmt: skip
        try:
            async with contextlib.aclosing(src.items()) as items:  # type: ignore[type-var]
                async for piece in items:
                    if not self.live:
                        break
                    self._out(src, piece, run)
            if self.live:
                self.status = "completed"
        except asyncio.CancelledError:
            if self.live:  # cancelled from outside, not stopped: the session is going away
                self.status, self.live = "cancelled", False
        except StepFailed as exc:
            self._failed(exc)
        except WavFormatError as exc:
            self._failed(StepFailed(ErrorCode.WORKER_FAILED, f"workflow {agent.name!r}: {exc}"))
        finally:
            run.cancel_all()
            self.live = False

    def _failed(self, exc: StepFailed) -> None:
        if self.live:
            log.warning("realtime turn %s: %s", self.id, exc.message, extra={"request_id": self.meta.request_id})
            self.status, self.error = "failed", exc

    def _out(self, src: Source, piece: Item, run: Run) -> None:
        if isinstance(piece, str) or not isinstance(src, PerSentence):  # a workflow that ends in text
            text = piece if isinstance(piece, str) else bytes(piece).decode(errors="replace")
            self._said.append(text)
            self.item.sentences.append(Spoken(text, self.item.audio_ms, self.item.audio_ms))
            self.on_text(self, text)
            return
        n = src.current
        while self._spoken < n and self._spoken < len(self._said):  # the sentence whose audio starts now
            at = self.item.audio_ms
            if self.item.sentences:
                self.item.sentences[-1].end_ms = at
            self.item.sentences.append(Spoken(self._said[self._spoken], at, at))
            self._spoken += 1
            self.on_text(self, self._said[self._spoken - 1])
        self.item.audio_ms += len(piece) * _MS_PER_BYTE
        if self.item.sentences:
            self.item.sentences[-1].end_ms = self.item.audio_ms
        self.on_audio(self, piece)
        if not self.t_audio:
            self.t_audio = perf_counter()
            self.timing.first_audio(run, self.agent.config.steps[-1].name, self.t_audio)

    def _tap(self, step: StepConfig, src: Source) -> Source:
        return _Said(src, self) if step.kind == "sentences" else src


class _Said:
    """The `sentences` step's output, passed on as it comes; each sentence kept by its response."""

    def __init__(self, src: Source, resp: Response) -> None:
        self.src, self.resp = src, resp

    @property
    def content_type(self) -> str:
        return self.src.content_type

    async def items(self) -> AsyncIterator[Item]:
        async for sentence in self.src.items():
            text = sentence if isinstance(sentence, str) else bytes(sentence).decode(errors="replace")
            if not self.resp._said:
                self.resp.timing.t_sentence = perf_counter()
            self.resp._said.append(text.strip())
            yield sentence
