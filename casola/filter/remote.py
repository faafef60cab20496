"""The model-based classifier: the input goes, as an ordinary request, to a `classify` model on a
worker, through the queue node's own front door (an in-process link), so it is scheduled, timed,
retried and refused like any other request.

The classify model answers JSON, either `{"flagged": bool, "label": str, "score": float}` or the
OpenAI moderation shape `{"results": [{"flagged": bool, "categories": {...}, "category_scores":
{...}}]}` (the label is then the highest-scoring flagged category). Its requests are never filtered
themselves: the link they travel on is the node's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from casola.filter.base import Verdict
from casola.net.link import LinkBase
from casola.wire import (
    FLAG_END,
    Buffer,
    ConnectionTerminated,
    ErrorMeta,
    Event,
    Frame,
    FrameType,
    RequestMeta,
    StreamReset,
    error_name,
)

__all__ = ["ClassifierFailed", "ModelClassifier", "parse_verdict"]

OnEvents = Callable[[LinkBase, list[Event]], None]
OnLost = Callable[[LinkBase, BaseException | None], None]
# Dials the node in-process and returns the link; the node treats it as its own (no auth, no filter).
Connect = Callable[[OnEvents, OnLost], Awaitable[LinkBase]]


class ClassifierFailed(Exception):
    """The classify model could not give a verdict (no worker, an error, a bad answer)."""


class _Pending:
    __slots__ = ("chunks", "future")

    def __init__(self, future: asyncio.Future[Verdict]) -> None:
        self.future = future
        self.chunks: list[Buffer] = []


class ModelClassifier:
    name = "model"

    def __init__(self, connect: Connect, model: str = "classify", timeout_ms: int = 2000) -> None:
        self.model, self.timeout_ms = model, timeout_ms
        self._connect = connect
        self._link: LinkBase | None = None
        self._pending: dict[int, _Pending] = {}

    async def start(self) -> None:
        self._link = await self._connect(self._on_events, self._on_lost)

    async def stop(self) -> None:
        if self._link is not None:
            self._link.close()
        self._fail_all("the classifier stopped")

    def classify(self, data: Buffer, content_type: str, model: str) -> Awaitable[Verdict]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Verdict] = loop.create_future()
        link = self._link
        if link is None or not link.is_up or link.conn.send_credit <= 0:
            fut.set_exception(ClassifierFailed("the classifier link is down or full"))
            return fut
        sid = link.conn.next_stream_id()
        meta = RequestMeta(self.model, self.timeout_ms, content_type, {"for-model": model}, False, "_filter")
        self._pending[sid] = _Pending(fut)
        link.send(Frame(FrameType.REQUEST, sid, meta, data, FLAG_END))
        return fut

    def _on_events(self, link: LinkBase, events: list[Event]) -> None:
        for ev in events:
            if type(ev) is Frame:
                p = self._pending.get(ev.stream_id)
                if p is None:
                    continue
                if ev.type is FrameType.ERROR:
                    del self._pending[ev.stream_id]
                    meta = ev.meta
                    assert isinstance(meta, ErrorMeta)
                    _settle(p, exc=ClassifierFailed(f"{error_name(meta.code)}: {meta.message}"))
                    continue
                if len(ev.payload):
                    p.chunks.append(ev.payload)
                if ev.end:
                    del self._pending[ev.stream_id]
                    body = p.chunks[0] if len(p.chunks) == 1 else b"".join(p.chunks)
                    try:
                        _settle(p, parse_verdict(body))
                    except ClassifierFailed as exc:
                        _settle(p, exc=exc)
            elif type(ev) is StreamReset:
                p = self._pending.pop(ev.stream_id, None)
                if p is not None:
                    _settle(p, exc=ClassifierFailed(f"stream reset: {ev.message}"))
            elif type(ev) is ConnectionTerminated:
                self._fail_all(f"the node ended the classifier link: {ev.message}")

    def _on_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        self._fail_all(f"classifier link lost: {exc or 'closed'}")

    def _fail_all(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            _settle(p, exc=ClassifierFailed(why))


def _settle(p: _Pending, verdict: Verdict | None = None, exc: BaseException | None = None) -> None:
    if p.future.done():
        return
    if exc is not None:
        p.future.set_exception(exc)
    else:
        p.future.set_result(verdict)  # type: ignore[arg-type]


def parse_verdict(body: Buffer) -> Verdict:
    """A classify model's JSON answer as a Verdict.

    Raises:
        ClassifierFailed: not JSON, or neither accepted shape.
    """
    try:
        doc: Any = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ClassifierFailed(f"the classify model's answer is not JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("results"), list) and doc["results"]:
        doc = doc["results"][0]
        if not isinstance(doc, dict):
            raise ClassifierFailed("moderation result is not an object")
        flagged = bool(doc.get("flagged"))
        cats = doc.get("categories") or {}
        scores = doc.get("category_scores") or {}
        label, score = "", 0.0
        for name, hit in cats.items() if isinstance(cats, dict) else ():
            s = scores.get(name, 1.0 if hit else 0.0) if isinstance(scores, dict) else 0.0
            if hit and isinstance(s, int | float) and s >= score:
                label, score = str(name), float(s)
        return Verdict(flagged=flagged, label=label, score=score, classifier="model")
    if isinstance(doc, dict) and isinstance(doc.get("flagged"), bool):
        score = doc.get("score", 1.0 if doc["flagged"] else 0.0)
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise ClassifierFailed("'score' must be a number")
        return Verdict(flagged=doc["flagged"], label=str(doc.get("label", "")), score=float(score), classifier="model")
    raise ClassifierFailed('expected {"flagged": bool, ...} or {"results": [{"flagged": bool, ...}]}')
