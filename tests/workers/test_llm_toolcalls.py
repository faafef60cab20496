"""The LLM handler with the tool-call shapes a small model writes (workers.output): bare and fenced JSON
calls end as OpenAI tool_calls, and `max_tool_calls` stops the model at the first call.

The models are tiny scripted LMs (workers.tiny) that answer, whatever the prompt, what Qwen2.5-0.5B
answers with tools on: two bare calls on two lines, or one fenced call.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from casola.wire import RequestMeta
from tests.require import need_module
from workers.spec import ModelSpec, SpecError

need_module("ctranslate2", "model-sets")
need_module("tokenizers", "model-sets")

from workers import tiny  # noqa: E402
from workers.llm import LLMModel  # noqa: E402

PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
LONDON = '{"name": "get_weather", "arguments": {"city": "London"}}'
FENCED = '```json\n{\n  "name": "set_timer",\n  "arguments": {\n    "seconds": 300\n  }\n}\n```'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
META = RequestMeta(model="agent", content_type="application/json")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toolcalls")
    return {
        "two": tiny.build_tiny_lm(root / "two", script=" " + PARIS + "\n" + LONDON),
        "fenced": tiny.build_tiny_lm(root / "fenced", script=" " + FENCED),
    }


def load(directory: Path, **options: Any) -> LLMModel:
    return LLMModel(ModelSpec(name="agent", kind="llm", path=directory, options={"end_tokens": ["</s>"], **options}))


def ask(model: LLMModel, **fields: Any) -> Any:
    body = json.dumps({"model": "agent", "messages": [{"role": "user", "content": "weather?"}], **fields})
    return model.run_request(body.encode(), META, threading.Event())


def whole(model: LLMModel, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.json.decode(ask(model, tools=TOOLS, **fields).body)
    return doc


def test_bare_calls_become_tool_calls(dirs: dict[str, Path]) -> None:
    doc = whole(load(dirs["two"]))
    message = doc["choices"][0]["message"]
    assert doc["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == ['{"city": "Paris"}', '{"city": "London"}']
    plain = msgspec.json.decode(ask(load(dirs["two"])).body)  # tools off: the JSON is the answer
    assert plain["choices"][0]["message"]["content"] == PARIS + "\n" + LONDON


def test_max_tool_calls_stops_at_the_first(dirs: dict[str, Path]) -> None:
    unlimited = whole(load(dirs["two"]))
    doc = whole(load(dirs["two"], max_tool_calls=1))
    (call,) = doc["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert doc["choices"][0]["finish_reason"] == "tool_calls"
    # The model was stopped when the first object closed, not run to its end token.
    assert doc["usage"]["completion_tokens"] < unlimited["usage"]["completion_tokens"]


def test_fenced_call_streamed(dirs: dict[str, Path]) -> None:
    reply = ask(load(dirs["fenced"], max_tool_calls=1), tools=TOOLS, stream=True)
    events = [msgspec.json.decode(e[6:-2]) for e in reply.body if e != b"data: [DONE]\n\n"]
    deltas = [e["choices"][0]["delta"] for e in events]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["function"] for c in calls] == [{"name": "set_timer", "arguments": '{"seconds": 300}'}]
    assert "".join(d.get("content") or "" for d in deltas) == ""  # the fence is no content
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("bad", [0, -1, "many"])
def test_max_tool_calls_must_be_a_positive_integer(dirs: dict[str, Path], bad: Any) -> None:
    with pytest.raises(SpecError, match=r"max_tool_calls must be at least 1|bad option"):
        load(dirs["two"], max_tool_calls=bad)
