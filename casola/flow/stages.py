"""The pipeline's pieces. Each stage reads the one before it as it produces (streaming hand-off)
and is itself read by the next: `items()` yields bytes (a model's answer as it streams) or str
(text deltas, sentences); `content_type` is known before the first item.

- `Given`: the workflow's input, or a checkpointed step's output on resume.
- `ModelStage`: one request with the previous output, whole; its answer passed on as it streams.
- `PerSentence`: one request per sentence, up to `lookahead` in flight, answers joined in order
  (WAV: one header, then every sentence's samples: one continuous stream).
- `Sentences`: text deltas to sentences, with the bounded wait of casola.flow.sentences.
- `Kept`: passes a step's output on and keeps it; when the step completes its output is handed to
  `on_complete` (an async run's checkpoint).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from casola.client import RequestFailed, Stream
from casola.flow.run import Run
from casola.flow.sentences import SentenceSplitter
from casola.flow.spec import StepConfig
from casola.flow.wav import WavJoin
from casola.net.errors import ConnectionLost
from casola.wire import Buffer, ErrorCode
from casola.wire.meta import FilterPolicy

__all__ = ["TEXT", "Given", "Kept", "ModelStage", "PerSentence", "Sentences", "Source", "whole", "whole_text"]

Item = Buffer | str
TEXT = "text/plain; charset=utf-8"


class Source(Protocol):
    @property
    def content_type(self) -> str: ...

    def items(self) -> AsyncIterator[Item]: ...


async def whole(src: Source) -> Buffer:
    """Everything `src` produces, as one buffer."""
    parts = [p.encode() if isinstance(p, str) else p async for p in src.items()]
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def whole_text(src: Source, what: str, run: Run) -> str:
    data = await whole(src)
    try:
        return bytes(data).decode()
    except UnicodeDecodeError:
        why = f"its input is not UTF-8 text ({src.content_type or 'no content type'})"
        raise run.fail(ErrorCode.BAD_REQUEST, what, why) from None


class Given:
    def __init__(self, content_type: str, items: list[Item]) -> None:
        self.content_type, self._items = content_type, items

    async def items(self) -> AsyncIterator[Item]:
        for item in self._items:
            yield item


class ModelStage:
    def __init__(self, run: Run, step: StepConfig, upstream: Source) -> None:
        self.run, self.step, self.upstream = run, step, upstream
        self.content_type = ""

    async def items(self) -> AsyncIterator[Item]:
        step, run = self.step, self.run
        body = await whole(self.upstream)
        ctype = step.content_type or self.upstream.content_type
        params = {**step.params, **run.params.get(step.name, {})}
        async with run.request(step.name, f"step {step.name!r}", step.model, body, ctype, params) as stream:
            async for chunk in _answer(stream, self):
                yield chunk


async def _answer(stream: Stream, stage: Any) -> AsyncIterator[Buffer]:
    """A step answer's pieces; the stage's content type is set from its head before the first."""
    async for chunk in stream:
        if not stage.content_type and stream.head is not None:
            stage.content_type = stream.head.content_type
        yield chunk
    if not stage.content_type and stream.head is not None:
        stage.content_type = stream.head.content_type


class Sentences:
    """Whole sentences from text deltas. A sentence mark at the end of what has arrived is held at
    most `max_wait_ms` for the next delta (which says whether it ended a sentence); the end of the
    stream gives out the rest at once: no timer runs when the text says enough."""

    content_type = TEXT

    def __init__(self, step: StepConfig, upstream: Source) -> None:
        self.step, self.upstream = step, upstream

    async def items(self) -> AsyncIterator[Item]:
        split = SentenceSplitter(self.step.min_chars, self.step.max_chars)
        wait = self.step.max_wait_ms / 1000
        deltas = aiter(self.upstream.items())
        pending: asyncio.Task[Item] | None = None  # the next delta, awaited with a bound
        try:
            while True:
                try:
                    if pending is None and not split.ends_pending():
                        delta = await anext(deltas)  # the common case: no task, no timer
                    else:
                        pending = pending or asyncio.ensure_future(anext(deltas))
                        done, _ = await asyncio.wait((pending,), timeout=wait)
                        if not done:
                            if sentence := split.take_pending():
                                yield sentence
                            continue
                        delta, pending = pending.result(), None
                except StopAsyncIteration:
                    break
                for sentence in split.feed(delta if isinstance(delta, str) else bytes(delta).decode()):
                    yield sentence
            if rest := split.flush():
                yield rest
        finally:
            if pending is not None:
                pending.cancel()


class PerSentence:
    """A model step run once per sentence (TTS), `lookahead` at once, its answers in order."""

    def __init__(self, run: Run, step: StepConfig, upstream: Source, filter_sentences: bool) -> None:
        self.run, self.step, self.upstream = run, step, upstream
        self.filter: FilterPolicy = "hold" if filter_sentences else ""
        self.params = {**step.params, **run.params.get(step.name, {})}  # the same for every sentence
        self.ctype = step.content_type or TEXT
        self.content_type = ""
        self.current = 0  # the sentence whose answer the last item came from (1-based; 0: none yet)

    async def items(self) -> AsyncIterator[Item]:
        sentences = aiter(self.upstream.items())
        first = await anext(sentences, None)  # pulled here, not in a task: the pipeline starts at once
        if first is None:
            return
        streams: asyncio.Queue[tuple[int, Any] | None] = asyncio.Queue()
        room = asyncio.Semaphore(self.step.lookahead)
        await room.acquire()
        streams.put_nowait((1, self._open(1, first)))
        feeder = asyncio.ensure_future(self._dispatch(sentences, streams, room))
        join = WavJoin()
        try:
            while (entry := await streams.get()) is not None:
                n, got = entry
                if isinstance(got, BaseException):
                    raise got
                try:
                    async for chunk in _answer(got, self):
                        if out := join.feed(n, chunk, self.content_type):
                            self.current = n
                            yield out
                except (RequestFailed, ConnectionLost) as exc:
                    raise self.run.failed(f"step {self.step.name!r} (sentence {n})", exc) from None
                finally:
                    self.run.door.cancel(got)
                    room.release()
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    def _open(self, n: int, sentence: Item) -> Stream:
        step = self.step
        body = sentence.encode() if isinstance(sentence, str) else sentence
        what = f"step {step.name!r} (sentence {n})"
        return self.run.open(step.name, what, step.model, body, self.ctype, self.params, filter=self.filter)

    async def _dispatch(
        self, sentences: AsyncIterator[Item], streams: asyncio.Queue[Any], room: asyncio.Semaphore
    ) -> None:
        """Start each later sentence's request as soon as it exists and a place is free."""
        n = 1
        try:
            async for sentence in sentences:
                await room.acquire()
                n += 1
                await streams.put((n, self._open(n, sentence)))
        except Exception as exc:
            await streams.put((n, exc))
        await streams.put(None)


class Kept:
    """A step's output passed on as produced and kept; once complete, `on_complete(name, ct, items)`."""

    def __init__(self, name: str, src: Source, on_complete: Callable[[str, str, list[Item]], Awaitable[None]]) -> None:
        self.name, self.src, self.on_complete = name, src, on_complete

    @property
    def content_type(self) -> str:
        return self.src.content_type

    async def items(self) -> AsyncIterator[Item]:
        kept: list[Item] = []
        async for item in self.src.items():
            kept.append(item)
            yield item
        await self.on_complete(self.name, self.src.content_type, kept)
