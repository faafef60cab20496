"""The LLM handler on the tiny models: scripted answers whole and streamed, stop strings, length,
tool calls, the manifest's system prompt, cancellation of a long generation, bad requests, and one
streamed request through a real worker and the ingress's OpenAI route.

The scripted models answer " Sure, turning on the lights now." (byte-level BPE pieces with a leading
space); the handler drops the answer's leading whitespace, so the content is "Sure, turning on the lights now."
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest

from casola.wire import RequestMeta
from casola.worker.call import HandlerError
from casola.worker.model import Reply
from workers.llm import LLMModel
from workers.loader import resolve
from workers.spec import SpecError

ANSWER = "Sure, turning on the lights now."
USER = [{"role": "user", "content": "Turn on the lights"}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "set_lights", "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}}},
    }
]
META = RequestMeta(model="chat", content_type="application/json")


@pytest.fixture(scope="module")
def chat(models_dir: Path) -> LLMModel:
    return LLMModel(resolve("chat", models_dir))


@pytest.fixture(scope="module")
def tools(models_dir: Path) -> LLMModel:
    return LLMModel(resolve("chat-tools", models_dir))


def with_options(models_dir: Path, name: str, **options: Any) -> LLMModel:
    spec = resolve(name, models_dir)
    return LLMModel(dataclasses.replace(spec, options={**spec.options, **options}))


def ask(model: LLMModel, cancelled: threading.Event | None = None, **fields: Any) -> Reply:
    body = json.dumps({"model": model.name, "messages": USER, **fields}).encode()
    reply = model.run_request(body, META, cancelled or threading.Event())
    assert isinstance(reply, Reply)
    return reply


def whole(model: LLMModel, **fields: Any) -> dict[str, Any]:
    reply = ask(model, **fields)
    assert reply.content_type == "application/json"
    assert isinstance(reply.body, bytes)
    doc: dict[str, Any] = msgspec.json.decode(reply.body)
    return doc


def sse(pieces: Iterable[Any]) -> list[Any]:
    """Each piece is exactly one SSE event; [DONE] comes last."""
    out = []
    for piece in pieces:
        assert piece.startswith(b"data: ") and piece.endswith(b"\n\n") and piece.count(b"\n\n") == 1
        data = piece[6:-2]
        out.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
    assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return out[:-1]


def streamed(model: LLMModel, **fields: Any) -> list[Any]:
    reply = ask(model, stream=True, **fields)
    assert reply.content_type == "text/event-stream"
    assert not isinstance(reply.body, bytes)
    return sse(reply.body)


def text_of(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


# --------------------------------------------------------------------------- answers
def test_whole_answer(chat: LLMModel) -> None:
    doc = whole(chat)
    assert doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-") and doc["model"] == "chat"
    choice = doc["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": ANSWER},
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = doc["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 6  # six script pieces; </s> not counted
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_matches_the_whole_answer(chat: LLMModel) -> None:
    events = streamed(chat, stream_options={"include_usage": True})
    first, *middle, finish, usage = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({e["id"] for e in events}) == 1
    assert text_of(events) == ANSWER == whole(chat)["choices"][0]["message"]["content"]
    assert len(middle) == 6  # one event per token
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(e["usage"] is None for e in events[:-1])
    assert usage["choices"] == [] and usage["usage"] == whole(chat)["usage"]


def test_stream_without_usage(chat: LLMModel) -> None:
    events = streamed(chat)
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_greedy_and_sampled_agree_on_a_scripted_model(chat: LLMModel) -> None:
    for fields in ({"temperature": 0}, {"temperature": 0.7, "top_p": 0.9}, {"frequency_penalty": 1.0}):
        assert whole(chat, **fields)["choices"][0]["message"]["content"] == ANSWER


def test_stop_string(chat: LLMModel) -> None:
    doc = whole(chat, stop="turning")
    assert doc["choices"][0]["message"]["content"] == "Sure, "  # as OpenAI: only the stop string is cut
    assert doc["choices"][0]["finish_reason"] == "stop" and doc["usage"]["completion_tokens"] == 2
    events = streamed(chat, stop=["lights", "xyz"])
    assert text_of(events) == "Sure, turning on the "
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens(chat: LLMModel) -> None:
    doc = whole(chat, max_tokens=3)
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens"] == 3
    assert doc["choices"][0]["message"]["content"] == "Sure, turning on"
    events = streamed(chat, max_completion_tokens=2)
    assert text_of(events) == "Sure, turning" and events[-1]["choices"][0]["finish_reason"] == "length"


def test_requests_run_concurrently(chat: LLMModel) -> None:
    with ThreadPoolExecutor(4) as pool:
        docs = list(pool.map(lambda n: whole(chat, max_tokens=n), [2, 3, 4, 6] * 2))
    assert [d["usage"]["completion_tokens"] for d in docs] == [2, 3, 4, 6] * 2


# --------------------------------------------------------------------------- tool calls
def test_tool_call_whole(tools: LLMModel) -> None:
    doc = whole(tools, tools=TOOLS)
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "set_lights", "arguments": '{"on": true}'}


def test_tool_call_streamed(tools: LLMModel) -> None:
    events = streamed(tools, tools=TOOLS, stream_options={"include_usage": True})
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert calls[0]["function"] == {"name": "set_lights", "arguments": '{"on": true}'}
    assert text_of(events) == ""
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["usage"]["completion_tokens"] == 7


def test_without_tools_the_block_is_plain_content(tools: LLMModel) -> None:
    for fields in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        doc = whole(tools, **fields)
        assert doc["choices"][0]["message"]["content"].startswith("<tool_call>")
        assert doc["choices"][0]["finish_reason"] == "stop"


# --------------------------------------------------------------------------- manifest options
def test_system_prompt_only_without_a_system_message(models_dir: Path, chat: LLMModel) -> None:
    prompted = with_options(models_dir, "chat", system_prompt="You are a lamp.")
    plain = whole(chat)["usage"]["prompt_tokens"]
    added = whole(prompted)["usage"]["prompt_tokens"]
    explicit = [{"role": "system", "content": "You are a lamp."}, *USER]
    assert added > plain
    assert added == whole(chat, messages=explicit)["usage"]["prompt_tokens"]
    own = [{"role": "developer", "content": "Hi."}, *USER]
    assert (
        whole(prompted, messages=own)["usage"]["prompt_tokens"] == whole(chat, messages=own)["usage"]["prompt_tokens"]
    )


def test_prompt_longer_than_the_context(models_dir: Path) -> None:
    small = with_options(models_dir, "chat", context=32)
    with pytest.raises(HandlerError, match="maximum context length is 32 tokens") as info:
        ask(small, messages=[{"role": "user", "content": "word " * 40}])
    assert info.value.param == "messages"
    doc = whole(small, max_tokens=1000)  # a max_tokens past the context is cut to what fits
    assert doc["usage"]["total_tokens"] <= 32


def test_bad_options_fail_at_load(models_dir: Path) -> None:
    with pytest.raises(SpecError, match="not in the vocabulary"):
        with_options(models_dir, "chat", end_tokens=["<|eot_id|>"])
    with pytest.raises(SpecError, match="bad option"):
        with_options(models_dir, "chat", context="big")


def test_ignore_eos_generates_max_tokens(models_dir: Path) -> None:
    doc = whole(LLMModel(resolve("chat-random", models_dir)), max_tokens=40)
    assert doc["usage"]["completion_tokens"] == 40 and doc["choices"][0]["finish_reason"] == "length"


def test_incremental_decoding_matches_whole_decoding(models_dir: Path) -> None:
    """Random weights emit lone UTF-8 byte pieces: the streamed text must equal one decode of all ids."""
    model = LLMModel(resolve("chat-random", models_dir))
    assert (
        text_of(streamed(model, temperature=0, max_tokens=200))
        == whole(model, temperature=0, max_tokens=200)["choices"][0]["message"]["content"]
    )


# --------------------------------------------------------------------------- cancellation
def generation_threads() -> list[threading.Thread]:
    # CTranslate2's generate_tokens runs the decoding loop's waiter in a thread named after its target.
    return [t for t in threading.enumerate() if "_catch_exception" in t.name]


@pytest.mark.parametrize("close", [True, False])
def test_cancel_stops_a_long_generation(models_dir: Path, close: bool) -> None:
    model = with_options(models_dir, "chat-random", context=200_000)
    cancelled = threading.Event()
    reply = ask(model, cancelled, stream=True, max_tokens=100_000)
    assert isinstance(reply.body, Generator)
    pieces: Generator[bytes, None, None] = reply.body
    got = [next(pieces) for _ in range(6)]
    assert b'"content"' in got[-1] and generation_threads()
    t0 = time.perf_counter()
    cancelled.set()
    if close:  # what BlockingModel does on CANCEL: set the event, then close the generator
        pieces.close()
    else:  # the event alone ends it at the next token
        assert next(pieces, None) is None
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"cancel took {elapsed:.3f} s"
    assert not generation_threads()  # CTranslate2's loop has ended, not just our iterator


def test_cancel_whole_answer(models_dir: Path) -> None:
    model = with_options(models_dir, "chat-random", context=200_000)
    cancelled = threading.Event()
    timer = threading.Timer(0.2, cancelled.set)
    timer.start()
    t0 = time.perf_counter()
    ask(model, cancelled, max_tokens=100_000)
    assert time.perf_counter() - t0 < 2
    assert not generation_threads()


# --------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "chat"}', "messages"),
        (b'{"messages": []}', "messages"),
        (json.dumps({"messages": USER, "n": 2}).encode(), "n"),
        (json.dumps({"messages": USER, "temperature": 3}).encode(), "temperature"),
        (
            json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
            "messages.[0].content.[0]",
        ),
        (b"{bad json", ""),
    ],
)
def test_bad_requests_are_refused_before_answering(chat: LLMModel, body: bytes, param: str) -> None:
    with pytest.raises(HandlerError) as info:
        chat.run_request(body, META, threading.Event())
    assert info.value.param == param


# --------------------------------------------------------------------------- through a worker
def test_streams_through_a_worker_and_the_openai_route(tmp_path: Path, chat: LLMModel) -> None:
    from casola.worker import WorkerConfig, WorkerRuntime
    from tests.e2e.stack import HttpClient, Stack, run_uvloop

    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt = WorkerRuntime(WorkerConfig(queue=[stack.queue_addr], capacity=2), [chat], stack.worker_key)
        await rt.start()
        await rt.wait_registered()
        await stack.wait_workers(1, "chat")
        client = await HttpClient.connect(stack.http_port)
        head = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
        body = json.dumps({"model": "chat", "messages": USER, "stream": True}).encode()
        r = await client.request("POST", "/openai/v1/chat/completions", body, head)
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(piece + b"\n\n" for piece in r.body.split(b"\n\n") if piece)
        assert text_of(events) == ANSWER
        bad = await client.request("POST", "/openai/v1/chat/completions", b'{"model": "chat", "messages": []}', head)
        assert bad.status == 400 and msgspec.json.decode(bad.body)["error"]["param"] == "messages"
        await client.close()
        await rt.stop()
        await stack.stop()

    run_uvloop(main)
