"""Decoded model text → what a chat.completions client sees: stop strings cut, tool calls extracted.

Pure Python, fed piece by piece as the model decodes; every class here is incremental: it holds back only
what may still turn into a stop string or a tool call, so a plain answer streams as it is made.

Tool calls come in the shapes models actually write (MODELS.md §7.1):
- Hermes `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, anywhere in the answer (SmolLM2, Hermes,
  Qwen as trained);
- a bare `{"name": ..., "arguments": ...}` object, or a fenced ```json block holding one, where a call may
  start: at the beginning of the answer or right after another call, whitespace aside. Qwen2.5-0.5B never
  writes its `<tool_call>` token (P ≈ 1e-10) and answers with one of these instead.
A candidate that turns out not to be a call goes out as content, unchanged.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any, Final, Literal

__all__ = ["TOOL_CLOSE", "TOOL_OPEN", "OutputFilter", "StopMatcher", "ToolCallParser", "new_tool_call", "partial_tail"]

TOOL_OPEN: Final = "<tool_call>"
TOOL_CLOSE: Final = "</tool_call>"
FENCE: Final = "```"
# The first key of a bare object that may be a call: anything else is an answer in JSON, released at once.
_CALL_KEYS: Final = ("name", "arguments", "parameters")
_FENCE_LANGS: Final = ("", "json")

Call = dict[str, Any]


def partial_tail(text: str, needles: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a needle: it may be one in the making."""
    best = 0
    for needle in needles:
        for k in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:k]):
                best = k
                break
    return best


class StopMatcher:
    """Cuts streamed text at the first stop string; holds back a tail that may be a stop string's start."""

    __slots__ = ("_held", "_stops", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text safe to emit now; sets `stopped` when a stop string was found (it and all after are cut)."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        cut = min((i for s in self._stops if (i := buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return buf[:cut]
        keep = partial_tail(buf, self._stops)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held tail once generation ended (it never became a stop string)."""
        held, self._held = self._held, ""
        return held


# --------------------------------------------------------------------------- tool calls
def new_tool_call(name: str, arguments: str) -> Call:
    fn = {"name": name, "arguments": arguments}
    return {"id": "call_" + secrets.token_hex(12), "type": "function", "function": fn}


def _parse_call(text: str) -> Call | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return new_tool_call(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _object_end(text: str) -> int | None:
    """Index just past the `}` closing the object `text` starts with, None while it is still open."""
    depth, in_string, escaped = 0, False, False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _may_be_call(obj: str) -> bool | None:
    """Whether an object's head can begin a call: its first key must be one of `_CALL_KEYS`.
    None while the head is too short to say."""
    head = obj[1:].lstrip()
    if not head:
        return None
    if head[0] != '"':
        return False
    key, quote, _ = head[1:].partition('"')
    if quote:
        return key in _CALL_KEYS
    return None if any(k.startswith(key) for k in _CALL_KEYS) else False


def _fence_open(text: str) -> int | Literal[False] | None:
    """Length of a ```json opener up to its object's `{`, False when `text` (which starts with a backtick)
    is no such opener, None while it may still become one."""
    if len(text) < len(FENCE):
        return None if FENCE.startswith(text) else False
    if not text.startswith(FENCE):
        return False
    end = len(FENCE)
    while end < len(text) and text[end].isalpha():
        end += 1
    lang = text[len(FENCE) : end].lower()
    if end == len(text):
        return None if any(known.startswith(lang) for known in _FENCE_LANGS) else False
    if lang not in _FENCE_LANGS:
        return False
    rest = text[end:].lstrip()
    if not rest:
        return None
    return len(text) - len(rest) if rest[0] == "{" else False


def _json_call(text: str, final: bool) -> tuple[int, Call, bool] | Literal[False] | None:
    """At a place a call may start: (length, call, fenced) when `text` begins with a bare or fenced call,
    False when it does not, None while more text must decide (`final`: no more text comes)."""
    fenced = text.startswith("`")
    start = _fence_open(text) if fenced else 0
    if start is None:
        return False if final else None
    if start is False:
        return False
    obj = text[start:]
    if (verdict := _may_be_call(obj)) is not True:
        return False if final or verdict is False else None
    end = _object_end(obj)
    if end is None:
        return False if final else None
    call = _parse_call(obj[:end])
    return (start + end, call, fenced) if call is not None else False


class ToolCallParser:
    """Splits streamed text into content and tool calls (see the module docstring for the shapes).

    With `max_calls`, the parser is `done` once it has that many calls: later text is dropped (Qwen 0.5B
    repeats or invents more; MODELS.md: take the first call only), and the caller may stop the model.
    """

    __slots__ = ("_at_start", "_buf", "_calls", "_close_fence", "_inside", "_max")

    def __init__(self, max_calls: int | None = None) -> None:
        self._buf = ""
        self._inside = False  # in a <tool_call> block
        self._at_start = True  # only whitespace or calls so far: a bare or fenced call may start here
        self._close_fence = False  # a fenced call was taken when its object closed: its ``` is still to come
        self._calls = 0
        self._max = max_calls

    @property
    def done(self) -> bool:
        """The call limit is reached: nothing more will be parsed."""
        return self._max is not None and self._calls >= self._max

    def feed(self, text: str) -> tuple[str, list[Call]]:
        """(content to emit now, tool calls completed by this text)."""
        if self.done:
            return "", []
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[Call]]:
        """What is left once generation ended: an unclosed block is a call if its JSON is complete."""
        content, calls = ("", []) if self.done else self._drain(final=True)
        rest, self._buf = self._buf, ""  # empty once done
        if self._inside:
            self._inside = False
            if (call := _parse_call(rest)) is not None:
                return content, [*calls, call]
            rest = TOOL_OPEN + rest
        return content + rest, calls

    def _drain(self, final: bool) -> tuple[str, list[Call]]:
        out: list[str] = []
        calls: list[Call] = []
        while self._buf and not self.done:
            if self._inside:
                progressed = self._in_block(out, calls)
            elif self._at_start:
                progressed = self._at_call_start(out, calls, final)
            else:
                progressed = self._scan(out)
            if not progressed:
                break
        if self.done:
            self._buf = ""
        return "".join(out), calls

    def _take(self, call: Call, calls: list[Call]) -> None:
        calls.append(call)
        self._calls += 1
        self._at_start = True

    def _in_block(self, out: list[str], calls: list[Call]) -> bool:
        j = self._buf.find(TOOL_CLOSE)
        if j < 0:
            return False
        body, self._buf, self._inside = self._buf[:j], self._buf[j + len(TOOL_CLOSE) :], False
        if (call := _parse_call(body)) is not None:
            self._take(call, calls)
        else:
            out.append(TOOL_OPEN + body + TOOL_CLOSE)
        return True

    def _at_call_start(self, out: list[str], calls: list[Call], final: bool) -> bool:
        if self._close_fence:  # a fenced call was taken: its closing ``` (and the newline before) is no content
            body = self._buf.lstrip()
            if body.startswith(FENCE) or (final and FENCE.startswith(body)):
                self._buf, self._close_fence = body[len(FENCE) :], False
                return True
            if FENCE.startswith(body):
                return False
            self._close_fence = False
        body = self._buf.lstrip()
        if len(body) < len(self._buf):  # whitespace between calls is content (OutputFilter drops it)
            out.append(self._buf[: len(self._buf) - len(body)])
            self._buf = body
            if not body:
                return False
        if body[0] not in "{`":
            self._at_start = False
            return True
        found = _json_call(body, final)
        if found is None:
            return False
        if found is False:
            self._at_start = False  # released as content by _scan
            return True
        length, call, fenced = found
        self._buf, self._close_fence = body[length:], fenced
        self._take(call, calls)
        return True

    def _scan(self, out: list[str]) -> bool:
        buf = self._buf
        i = buf.find(TOOL_OPEN)
        if i < 0:
            keep = partial_tail(buf, (TOOL_OPEN,))
            out.append(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        out.append(buf[:i])
        self._buf, self._inside = buf[i + len(TOOL_OPEN) :], True
        return True


# --------------------------------------------------------------------------- output filter
class OutputFilter:
    """Decoded model text → what the client sees: stop strings cut, tool calls extracted, the answer's
    leading whitespace dropped (byte-level BPE models start it with a space; OpenAI answers never do),
    and, when tools are on, whitespace before a tool call dropped (models put newlines between blocks).
    `max_tool_calls` (tools on only) ends the answer at that many calls: see `done`."""

    __slots__ = ("_any_calls", "_started", "_stop", "_tools", "_ws")

    def __init__(self, stop: Sequence[str] = (), tools: bool = False, max_tool_calls: int | None = None) -> None:
        self._stop = StopMatcher(stop)
        self._tools = ToolCallParser(max_tool_calls) if tools else None
        self._started = False  # some non-whitespace content went out
        self._ws = ""  # trailing whitespace held back (tools on only)
        self._any_calls = False

    @property
    def stopped(self) -> bool:
        """A stop string was found."""
        return self._stop.stopped

    @property
    def done(self) -> bool:
        """Nothing more can come out: a stop string was found, or the tool-call limit was reached."""
        return self._stop.stopped or (self._tools is not None and self._tools.done)

    def feed(self, text: str) -> tuple[str, list[Call]]:
        """(content delta, completed tool calls) for the next piece of decoded text."""
        return self._shape(*self._split(self._stop.feed(text)))

    def finish(self) -> tuple[str, list[Call]]:
        """The held-back rest once generation ended; trailing whitespace survives unless tool calls came."""
        content, calls = self._split(self._stop.flush())
        if self._tools is not None:
            rest, more = self._tools.finish()
            content, calls = content + rest, calls + more
        content, calls = self._shape(content, calls)
        if not self._any_calls and self._started:
            content, self._ws = content + self._ws, ""
        return content, calls

    def _split(self, text: str) -> tuple[str, list[Call]]:
        if self._tools is None or not text:
            return text, []
        return self._tools.feed(text)

    def _shape(self, content: str, calls: list[Call]) -> tuple[str, list[Call]]:
        if not self._started:
            content = content.lstrip()
            self._started = bool(content)
        if self._tools is not None:
            if content:  # it came before the calls: held whitespace goes out only if text follows it
                body = content.rstrip()
                content, self._ws = (self._ws + body, content[len(body) :]) if body else ("", self._ws + content)
            if calls:
                self._any_calls, self._ws = True, ""
        return content, calls
