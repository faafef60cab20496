"""The pure chat.completions helpers: validation, template, stop strings, tool calls, response encoding."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from casola.wire import ErrorCode
from casola.worker.call import HandlerError
from workers.chat import (
    DEFAULT_TEMPLATE,
    DONE,
    ChatTemplate,
    ChunkEncoder,
    OutputFilter,
    StopMatcher,
    ToolCallParser,
    completion_body,
    parse_request,
)

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "set_lights", "parameters": {"type": "object"}}}


def parse(**fields: Any) -> Any:
    return parse_request(json.dumps({"model": "chat", "messages": USER, **fields}).encode())


def refused(body: Any) -> HandlerError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(HandlerError) as info:
        parse_request(raw)
    return info.value


# --------------------------------------------------------------------------- validation
def test_defaults() -> None:
    req = parse()
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert (req.stream, req.include_usage, req.temperature, req.top_p, req.max_tokens) == (
        False,
        False,
        None,
        1.0,
        None,
    )
    assert req.stop == [] and req.tools == [] and req.seed is None


def test_fields() -> None:
    req = parse(
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        top_p=0.5,
        max_tokens=7,
        stop="END",
        seed=3,
        tools=[TOOL],
        frequency_penalty=1,
        user="u1",
        response_format={"type": "json_object"},
        parallel_tool_calls=True,  # unknown to us: ignored
    )
    assert (req.stream, req.include_usage, req.temperature, req.top_p, req.max_tokens) == (True, True, 0.0, 0.5, 7)
    assert (req.stop, req.seed, req.tools, req.frequency_penalty, req.user) == (["END"], 3, [TOOL], 1.0, "u1")
    assert parse(max_completion_tokens=5, max_tokens=9).max_tokens == 5
    assert parse(stop=["a", "b"]).stop == ["a", "b"]
    assert parse(tools=[TOOL], tool_choice="none").tools == []
    assert parse(stream_options={"include_usage": True}).include_usage is False  # only when streaming


def test_message_shapes() -> None:
    req = parse(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "set_lights", "arguments": '{"on": true}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ]
    )
    system, user, assistant, tool = req.messages
    assert system == {"role": "system", "content": "be brief"}
    assert user["content"] == "a\nb"
    assert assistant["tool_calls"][0]["function"] == {"name": "set_lights", "arguments": {"on": True}}
    assert tool == {"role": "tool", "content": "done", "tool_call_id": "c1"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user"}]}, "messages.[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.[0].content.[0]"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.[0].tool_call_id"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "top_p": 1.5}, "top_p"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": USER, "stop": 5}, "stop"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "tools": [{"type": "retrieval"}]}, "tools.[0]"),
        ({"messages": USER, "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"messages": USER, "response_format": {"type": "json_schema"}}, "response_format.type"),
        ({"messages": USER, "logprobs": True}, "logprobs"),
    ],
)
def test_invalid(body: dict[str, Any], param: str) -> None:
    err = refused(body)
    assert err.param == param and err.code == ErrorCode.BAD_REQUEST
    assert param.split(".")[0] in err.message


def test_messages_errors_read_like_openai() -> None:
    assert refused({"messages": []}).message == "'messages' must be a non-empty array."
    assert refused({"model": "m"}).message == "Missing required parameter: 'messages'."
    assert refused({"messages": USER, "temperature": 3}).message == (
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead."
    )
    assert "expected an array, but got a string" in refused({"messages": "hi"}).message


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_bad_json(raw: bytes) -> None:
    err = refused(raw)
    assert err.param == ""  # as OpenAI: param null for a body that is not a JSON object
    assert "JSON" in err.message


# --------------------------------------------------------------------------- template
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_renders_messages_and_tools() -> None:
    t = ChatTemplate(CHATML)
    assert t.render(USER) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = t.render(USER, [{"type": "function", "function": {"name": "a<b>"}}])
    assert '{"type": "function", "function": {"name": "a<b>"}}' in out  # no HTML escaping, unlike jinja's tojson
    assert t.render(USER, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_template_blocks_are_trimmed_and_tokens_passed() -> None:
    t = ChatTemplate(
        "{{ bos_token }}\n{% for m in messages %}\n  {% if m %}{{ m.content }}{{ eos_token }}{% endif %}\n{% endfor %}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert t.render(USER) == "<s>\nhi</s>"


def test_template_raise_exception_is_a_client_error() -> None:
    t = ChatTemplate("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}ok")
    with pytest.raises(HandlerError, match="system first") as info:
        t.render(USER)
    assert info.value.param == "messages"


def test_template_is_sandboxed() -> None:
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(HandlerError):
        t.render(USER)


def test_default_template_with_tool_history() -> None:
    req = parse(
        messages=[
            {"role": "system", "content": "S"},
            *USER,
            {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": "1", "content": "ok"},
        ],
        tools=[TOOL],
    )
    out = ChatTemplate(DEFAULT_TEMPLATE).render(req.messages, req.tools)
    assert out.startswith("<|im_start|>system\nYou may call functions.")
    assert '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>' in out
    assert "<|im_start|>user\nok<|im_end|>" in out and out.endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------- stop strings
def feed_all(m: StopMatcher, pieces: list[str]) -> str:
    out = ""
    for p in pieces:
        out += m.feed(p)
        if m.stopped:
            return out
    return out + m.flush()


@pytest.mark.parametrize(
    "pieces",
    [["Hello ", "wor", "ld", " END", " more"], ["Hello world E", "N", "D more"], list("Hello world END more")],
)
def test_stop_across_pieces(pieces: list[str]) -> None:
    m = StopMatcher(["END", "xyz"])
    assert feed_all(m, pieces) == "Hello world " and m.stopped


def test_stop_holds_back_only_a_possible_start() -> None:
    m = StopMatcher(["END"])
    assert m.feed("abcE") == "abc"  # "E" may begin END
    assert m.feed("x") == "Ex"  # it did not
    assert m.feed("EN") == ""
    assert m.flush() == "EN" and not m.stopped


def test_stop_earliest_of_several() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel"


def test_no_stop_strings_pass_through() -> None:
    m = StopMatcher([])
    assert m.feed("a") == "a" and m.flush() == ""


# --------------------------------------------------------------------------- tool calls
CALL = '<tool_call>\n{"name": "set_lights", "arguments": {"on": true}}\n</tool_call>'


def run_parser(pieces: list[str], p: ToolCallParser | None = None) -> tuple[str, list[dict[str, Any]]]:
    p = p or ToolCallParser()
    content = ""
    calls: list[dict[str, Any]] = []
    for piece in pieces:
        c, new = p.feed(piece)
        content, calls = content + c, calls + new
    c, new = p.finish()
    return content + c, calls + new


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 1000])
def test_tool_call_across_token_boundaries(size: int) -> None:
    text = "Let me do that." + CALL
    content, calls = run_parser([text[i : i + size] for i in range(0, len(text), size)])
    assert content == "Let me do that."
    assert len(calls) == 1
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
    assert call["function"] == {"name": "set_lights", "arguments": '{"on": true}'}


def test_content_streams_before_the_block() -> None:
    p = ToolCallParser()
    assert p.feed("Sure <tool") == ("Sure ", [])  # "<tool" may begin a block: held
    assert p.feed("box>") == ("<toolbox>", [])
    assert p.feed(CALL)[1][0]["function"]["name"] == "set_lights"


def test_two_calls_and_string_arguments() -> None:
    second = '<tool_call>{"name": "dim", "arguments": "{\\"level\\": 3}"}</tool_call>'
    content, calls = run_parser([CALL + "\n" + second])
    assert [c["function"]["name"] for c in calls] == ["set_lights", "dim"]
    assert calls[1]["function"]["arguments"] == '{"level": 3}'
    assert calls[0]["id"] != calls[1]["id"]
    assert content == "\n"


def test_invalid_block_stays_content() -> None:
    content, calls = run_parser(["<tool_call>not json</tool_call> ok"])
    assert calls == [] and content == "<tool_call>not json</tool_call> ok"


def test_unclosed_block_at_the_end() -> None:
    assert run_parser(['<tool_call>{"name": "f", "arguments": {}}'])[1][0]["function"]["arguments"] == "{}"
    assert run_parser(['<tool_call>{"name": "f", "argu'])[0] == '<tool_call>{"name": "f", "argu'


# Qwen2.5-0.5B's answers with tools on, as it writes them (MODELS.md §7.1: never the <tool_call> token).
BARE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
FENCED = (
    '```json\n{\n  "name": "set_timer",\n  "arguments": {\n    "seconds": 300,\n    "label": "5 minutes"\n  }\n}\n```'
)


def split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_bare_and_fenced_calls_across_token_boundaries(size: int) -> None:
    content, calls = run_parser(split(BARE, size))
    assert content == "" and [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    content, calls = run_parser(split(FENCED, size))
    assert content == "" and [c["function"] for c in calls] == [
        {"name": "set_timer", "arguments": '{"seconds": 300, "label": "5 minutes"}'}
    ]
    content, calls = run_parser(split("\n" + BARE + "\n" + FENCED + "\n" + CALL, size))  # one after another
    assert [c["function"]["name"] for c in calls] == ["get_weather", "set_timer", "set_lights"]
    assert content.strip() == ""


def test_a_fenced_call_is_taken_when_its_object_closes() -> None:
    p = ToolCallParser()
    head, tail = FENCED[: FENCED.rindex("}") + 1], FENCED[FENCED.rindex("}") + 1 :]
    assert p.feed(head)[1][0]["function"]["name"] == "set_timer"  # the closing fence is not awaited
    assert p.feed(tail) == ("", [])  # ... and swallowed when it comes
    assert p.finish() == ("", [])
    assert run_parser([FENCED[:-2]])[1][0]["function"]["name"] == "set_timer"  # cut short: still the call


def test_plain_text_streams_at_once_with_tools_on() -> None:
    p = ToolCallParser()
    for piece in [" The", " capital", " is", " Paris", "."]:
        assert p.feed(piece) == (piece, [])
    p = ToolCallParser()
    assert p.feed("`") == ("", []) and p.feed("``") == ("", [])  # may open a ```json block
    assert p.feed("py") == ("```py", [])  # a code block, not a call: out at once
    assert p.feed("thon\nx = {1}\n```") == ("thon\nx = {1}\n```", [])
    p = ToolCallParser()
    assert p.feed('{"na') == ("", [])  # may become {"name": ...}
    assert p.feed('me": 3') == ("", [])
    assert p.finish() == ('{"name": 3', [])  # never closed: content
    p = ToolCallParser()
    assert p.feed('{"answer') == ('{"answer', [])  # an answer in JSON: its first key says so at once


@pytest.mark.parametrize(
    "text",
    [
        '{"name": 3, "arguments": {}}',  # name is not a string
        '{"city": "Paris"}',
        "{not json}",
        "```json\n[1, 2]\n```",
        "```\nprint(1)\n```",
        "Sure: " + BARE,  # a bare object is a call only at the start of the answer or right after a call
    ],
)
def test_json_that_is_not_a_call_stays_content(text: str) -> None:
    assert run_parser(split(text, 3)) == (text, [])


def test_max_calls_takes_the_first_and_stops() -> None:
    p = ToolCallParser(max_calls=1)
    content, calls = p.feed(BARE + "\n" + CALL + " and more")
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather"] and p.done
    assert p.feed(BARE) == ("", []) and p.finish() == ("", [])
    content, calls = run_parser(["Ok. ", CALL, CALL], ToolCallParser(max_calls=1))
    assert content == "Ok. " and len(calls) == 1
    content, calls = run_parser(split(BARE + "\n" + BARE, 4))
    assert len(calls) == 2  # no limit by default


# --------------------------------------------------------------------------- output filter
def run_filter(f: OutputFilter, pieces: list[str]) -> tuple[str, list[dict[str, Any]]]:
    content = ""
    calls: list[dict[str, Any]] = []
    for piece in pieces:
        c, new = f.feed(piece)
        content, calls = content + c, calls + new
        if f.stopped:
            break
    c, new = f.finish()
    return content + c, calls + new


def test_filter_strips_the_leading_space_only() -> None:
    assert run_filter(OutputFilter(), [" Sure,", " turning", " on. ", "\n"]) == ("Sure, turning on. \n", [])
    assert run_filter(OutputFilter(["turning"]), [" Sure,", " turning", " on."]) == ("Sure, ", [])


def test_filter_tools_drop_whitespace_around_calls() -> None:
    f = OutputFilter(tools=True)
    assert run_filter(f, ["\n", CALL, "\n\n"])[0] == ""
    f = OutputFilter(tools=True)
    content, calls = run_filter(f, ["Ok", "\n", " done", "\n", CALL])
    assert content == "Ok\n done" and len(calls) == 1
    assert run_filter(OutputFilter(tools=True), ["a ", "b", " "]) == ("a b ", [])


def test_filter_max_tool_calls_is_done_after_the_first() -> None:
    f = OutputFilter(tools=True, max_tool_calls=1)
    assert f.feed(" ") == ("", []) and not f.done
    content, calls = f.feed(BARE[:-1])
    assert (content, calls, f.done) == ("", [], False)
    content, calls = f.feed("}\n\n")
    assert content == "" and len(calls) == 1 and f.done and not f.stopped
    assert f.finish() == ("", [])
    f = OutputFilter(["STOP"], tools=True)
    assert run_filter(f, ["Hi STOP", BARE]) == ("Hi ", []) and f.done and f.stopped
    assert not OutputFilter(max_tool_calls=1).done  # tools off: the limit means nothing


# --------------------------------------------------------------------------- encoding
def events(raw: list[bytes]) -> list[Any]:
    out = []
    for event in raw:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
        data = event[6:-2]
        out.append(data.decode() if data == b"[DONE]" else msgspec.json.decode(data))
    return out


def test_chunks_like_openai() -> None:
    enc = ChunkEncoder("chatcmpl-1", 1700000000, "chat")
    role, text, calls, fin = events(
        [
            enc.role(),
            enc.content('say "hi"\n'),
            enc.tool_calls([{"id": "call_1", "type": "function"}], 2),
            enc.finish("stop"),
        ]
    )
    assert role == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "chat",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ],
    }
    assert text["choices"][0]["delta"] == {"content": 'say "hi"\n'}
    assert calls["choices"][0]["delta"] == {"tool_calls": [{"index": 2, "id": "call_1", "type": "function"}]}
    assert fin["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert all("usage" not in e for e in (role, text, calls, fin))
    assert events([DONE]) == ["[DONE]"]


def test_chunks_with_usage() -> None:
    enc = ChunkEncoder("chatcmpl-1", 1, "chat", include_usage=True)
    role, text, fin, usage = events([enc.role(), enc.content("x"), enc.finish("length"), enc.usage(5, 3)])
    assert role["usage"] is None and text["usage"] is None and fin["usage"] is None
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert usage["object"] == "chat.completion.chunk" and usage["id"] == "chatcmpl-1"


def test_completion_body() -> None:
    body = msgspec.json.decode(completion_body("chatcmpl-1", 2, "chat", "hi", [], "stop", 4, 1))
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 2,
        "model": "chat",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
    }
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msg = msgspec.json.decode(completion_body("c", 2, "m", "", [call], "tool_calls", 4, 1))["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": None, "tool_calls": [call]}
