"""The `llm` step: a streamed chat completion with a tool-call loop.

Round after round, the model is asked (OpenAI chat.completions body, `"stream": true`, to an `llm`
worker); its text deltas are passed on as they arrive (the next step starts on the first usable
piece), and the tool calls it makes run, in parallel, as the workflow's tools. A call to a tool
the step does not list, or with arguments its schema rejects, never runs: the model is told why in
its result; with `grounded = true` so does a call whose string arguments the user never said. The
results go back as messages (`tool_results = "messages"`: role "tool"), or as one
plain user message (`"text"`: small models loop on tool turns, MODELS.md §7.1), and the next round
starts. The round after `max_rounds` offers no tools, so the model answers in words. A JSON input
`{"messages": [...]}` is the conversation so far (its last turn the user's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from casola.client import Stream
from casola.flow.run import Run, StepFailed, typed
from casola.flow.spec import StepConfig
from casola.flow.stages import TEXT, Item, Source, whole_text
from casola.flow.tools import Tool
from casola.wire import ErrorCode

__all__ = ["LlmStage", "StreamedAnswer"]

log = logging.getLogger("casola.flow")

# What a request's `<step>.<name>` params may not set in the chat body: the conversation, the tools
# offered and the streaming are the step's own.
_NOT_FROM_REQUEST = frozenset({"messages", "tools", "tool_choice", "stream", "stream_options", "functions"})
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class StreamedAnswer:
    """One streamed chat answer as its deltas arrive: its text and its tool calls, merged by index
    (OpenAI streams a call's arguments in pieces; our workers send each call whole)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}

    def take(self, delta: dict[str, Any]) -> str:
        for c in delta.get("tool_calls") or ():
            slot = self.calls.setdefault(int(c.get("index", len(self.calls))), {"id": "", "name": "", "arguments": ""})
            fn = c.get("function") or {}
            slot["id"] = c.get("id") or slot["id"]
            slot["name"] += fn.get("name") or ""
            slot["arguments"] += fn.get("arguments") or ""
        text = delta.get("content") or ""
        if text:
            self.text.append(text)
        return text


async def _sse_deltas(stream: Stream) -> AsyncIterator[dict[str, Any]]:
    """The `delta` of each `chat.completion.chunk` event of a streamed answer, read to the stream's
    END (`[DONE]` comes just before it: leaving there would cancel a finished request)."""
    buf = b""
    done = False
    async for chunk in stream:
        if done:
            continue
        buf = buf + chunk if buf else bytes(chunk)
        while (end := buf.find(b"\n\n")) >= 0:
            event, buf = buf[:end], buf[end + 2 :]
            if not event.startswith(b"data:"):
                continue
            data = event[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            for choice in _decode(data).get("choices") or ():
                yield choice.get("delta") or {}


class LlmStage:
    content_type = TEXT

    def __init__(self, run: Run, step: StepConfig, tools: dict[str, Tool], upstream: Source) -> None:
        self.run, self.step, self.upstream = run, step, upstream
        self.tools = {name: tools[name] for name in step.tools}
        self.rounds = 0
        self.question = ""
        self.refused_all = False  # a round's every call was refused (on_rejected = "answer")

    async def items(self) -> AsyncIterator[Item]:
        step = self.step
        text = await whole_text(self.upstream, f"step {step.name!r}", self.run)
        conversation, system = _conversation(text, self.upstream.content_type, self.run, step.name)
        question = self.question = conversation[-1]["content"]
        system = system or step.system
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        messages += conversation
        for round_no in range(step.max_rounds + 1):
            offer = bool(self.tools) and round_no < step.max_rounds and not self.refused_all
            answer = StreamedAnswer()
            async for text in self._ask(messages, offer, answer):
                yield text
            if not answer.calls:
                return
            calls = list(answer.calls.values())
            results, ran = await self._run_calls(calls)
            if said := self._confirmations(calls, results):
                yield said  # an action's templated confirmation: no round for the model to read it out
                return
            if not ran and step.on_rejected == "answer":
                self.refused_all = True  # asked again as it was, with no tools: it must answer in words
                continue
            messages += self._history(answer, results, question)

    async def _ask(self, messages: list[dict[str, Any]], offer: bool, answer: StreamedAnswer) -> AsyncIterator[str]:
        step, run = self.step, self.run
        self.rounds += 1
        body: dict[str, Any] = dict(step.params)  # typed already (TOML); a header's values are strings
        asked = run.params.get(step.name, {})
        body.update({k: typed(v) for k, v in asked.items() if k not in _NOT_FROM_REQUEST})
        body.update(messages=messages, stream=True)
        if offer:
            body["tools"] = [t.schema for t in self.tools.values()]
        what = f"step {step.name!r} (round {self.rounds})"
        async with run.request(step.name, what, step.model, _encode(body), "application/json", {}) as stream:
            async for delta in _sse_deltas(stream):
                if text := answer.take(delta):
                    yield text

    async def _run_calls(self, calls: list[dict[str, str]]) -> tuple[list[str], int]:
        """Each call's result as text for the model, and how many ran; the valid ones run at once,
        in parallel, with their arguments as checked (pruned) also in the history."""

        async def one(i: int, call: dict[str, str]) -> str:
            tool = self.tools.get(call["name"])
            if i >= self.step.max_calls:  # a model cannot fan out without bound
                return f"error: at most {self.step.max_calls} tool calls run from one answer; this one did not"
            if tool is None:
                known = ", ".join(self.tools) or "none"
                log.info("%s: rejected a call to unknown tool %r", self.step.name, call["name"])
                return f"error: there is no tool named {call['name']!r} (tools: {known}); answer without it"
            args, why = tool.check(call["arguments"], self.step.prune_arguments)
            if not why and self.step.grounded:
                why = _ungrounded(tool, args, self.question)
            if why:
                log.info("%s: rejected a call: %s", self.step.name, why)
                return f"error: {why}; the tool did not run"
            call["arguments"] = args.decode()  # the history shows what ran, not what was refused
            ran.append(call)
            try:
                out = await tool.call(self.run, f"{self.step.name}.{tool.name}", args)
            except StepFailed as exc:  # the model is told no more than that (its words may be spoken)
                log.warning("%s: %s", self.step.name, exc.message, extra={"request_id": self.run.meta.request_id})
                return f"error: the tool {tool.name} failed; answer without it"
            return bytes(out).decode(errors="replace")

        ran: list[dict[str, str]] = []
        if len(calls) == 1:  # the common case: no task to run one call in
            return [await one(0, calls[0])], len(ran)
        results = list(await asyncio.gather(*(one(i, c) for i, c in enumerate(calls))))
        return results, len(ran)

    def _confirmations(self, calls: list[dict[str, str]], results: list[str]) -> str:
        """The tools' own answers (ToolConfig.answer) when every call has one, else ""."""
        out = []
        for call, result in zip(calls, results, strict=True):
            tool = self.tools.get(call["name"])
            if tool is None or not tool.config.answer or result.startswith("error: "):
                return ""
            try:
                said = _decode(result).get(tool.config.answer)
            except (msgspec.DecodeError, AttributeError):
                return ""
            if not isinstance(said, str) or not said.strip():
                return ""
            out.append(said.strip())
        return " ".join(out)

    def _history(self, answer: StreamedAnswer, results: list[str], question: str) -> list[dict[str, Any]]:
        calls = list(answer.calls.values())
        if self.step.tool_results == "text":
            lines = [f"{c['name']}({c['arguments']}) returned: {r}" for c, r in zip(calls, results, strict=True)]
            prompt = "\n".join(lines) + f"\n\nUsing these results, answer in one or two short sentences: {question}"
            return [{"role": "user", "content": prompt}]
        ids = [c["id"] or f"call_{self.rounds}_{i}" for i, c in enumerate(calls)]
        assistant = {
            "role": "assistant",
            "content": "".join(answer.text) or None,
            "tool_calls": [
                {"id": i, "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for i, c in zip(ids, calls, strict=True)
            ],
        }
        tool_turns = [{"role": "tool", "tool_call_id": i, "content": r} for i, r in zip(ids, results, strict=True)]
        return [assistant, *tool_turns]


def _ungrounded(tool: Tool, args: bytes, question: str) -> str:
    """Why a call is not grounded in what the user said (`grounded = true`), or "": each required
    string argument must occur in the user's words, ignoring case. A 0.5B model answers "What is
    the capital of France?" with get_weather(city="Paris"): Paris was never said (docs/models.md)."""
    said, values = question.casefold(), _decode(args) or {}
    for name in tool.config.parameters.get("required", ()):
        value = values.get(name)
        if isinstance(value, str) and value.strip() and value.strip().casefold() not in said:
            return f"{tool.name}: the user did not mention {value!r} (argument {name}); answer without the tool"
    return ""


_ROLES = frozenset({"user", "assistant"})


def _conversation(text: str, content_type: str, run: Run, step: str) -> tuple[list[dict[str, str]], str]:
    """The turns the model is given, and the system prompt the input names instead of the step's
    (""): the input as the user's message, or, for a JSON object with
    `"messages": [{"role": "user"|"assistant", "content": "..."}, ...]` ending with the user's, the
    conversation so far (a realtime session's history; a client's own), and its `"system"`.

    Raises:
        StepFailed: a JSON conversation that is not one (a 400 naming the step).
    """
    if content_type.partition(";")[0].strip().lower() != "application/json":
        return [{"role": "user", "content": text.strip()}], ""
    try:
        doc = _decode(text)
    except msgspec.DecodeError:
        doc = None
    if not isinstance(doc, dict) or "messages" not in doc:  # other JSON (fal's bodies): the user's words
        return [{"role": "user", "content": text.strip()}], ""
    turns = doc["messages"]
    ok = (
        isinstance(turns, list)
        and bool(turns)
        and all(isinstance(t, dict) and t.get("role") in _ROLES and isinstance(t.get("content"), str) for t in turns)
    )
    if not ok or turns[-1]["role"] != "user":
        why = (
            'a JSON input is {"messages": [{"role": "user"|"assistant", "content": "..."}, ...]}, the last the user\'s'
        )
        raise run.fail(ErrorCode.BAD_REQUEST, f"step {step!r}", why)
    system = doc.get("system")
    if system is not None and not isinstance(system, str):
        raise run.fail(ErrorCode.BAD_REQUEST, f"step {step!r}", '"system" is the system prompt, a string')
    return [{"role": t["role"], "content": t["content"]} for t in turns], system or ""
