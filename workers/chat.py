"""OpenAI chat.completions without the model: request validation, chat-template rendering and the response
encoders (one JSON object, or `chat.completion.chunk` SSE events). Stop strings and tool calls in the
model's text are `workers.output`'s job (re-exported here).

Everything here is pure Python (msgspec, jinja2), so the LLM handler (`workers.llm`) only adds the model.
Invalid input raises `HandlerError(message, param=...)` with OpenAI's wording and parameter names, which
the ingress maps to an HTTP 400 `invalid_request_error`.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Final, cast

import msgspec
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from casola.wire import Buffer
from casola.worker.call import HandlerError
from workers.output import OutputFilter, StopMatcher, ToolCallParser, new_tool_call

__all__ = [
    "DEFAULT_TEMPLATE",
    "DONE",
    "ChatRequest",
    "ChatTemplate",
    "ChunkEncoder",
    "OutputFilter",
    "StopMatcher",
    "ToolCallParser",
    "completion_body",
    "new_completion_id",
    "new_tool_call",
    "parse_request",
]

MAX_STOP: Final = 4  # OpenAI's limit on `stop`
MAX_TOOLS: Final = 128  # OpenAI's limit on `tools`
ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
DONE: Final = b"data: [DONE]\n\n"

# Plain ChatML (tools are listed in a system turn, Hermes style), for a model directory without a
# chat_template.jinja; real and tiny models ship their own.
DEFAULT_TEMPLATE: Final = """\
{% if tools %}<|im_start|>system
You may call functions. Their signatures, within <tools></tools> XML tags:
<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>
Return each call as <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call><|im_end|>
{% endif %}
{% for m in messages %}<|im_start|>{{ 'user' if m.role == 'tool' else m.role }}
{{ m.content or '' }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


# --------------------------------------------------------------------------- request
class ChatRequest(msgspec.Struct, kw_only=True):
    """A validated chat.completions request; `messages` and `tools` are ready for the chat template."""

    messages: list[dict[str, Any]]
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None  # None: the model's default (OpenAI's is 1)
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = []
    seed: int | None = None
    tools: list[dict[str, Any]] = []  # empty when tool_choice is "none"
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: str = ""


# JSON type names as OpenAI's errors spell them; bool first, as it is also an int in Python.
_TYPE_NAMES: Final[dict[type, str]] = {
    bool: "a boolean",
    int: "an integer",
    float: "a decimal",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _got(value: Any) -> str:
    return next((name for t, name in _TYPE_NAMES.items() if isinstance(value, t)), "null")


def _type_error(param: str, want: str, value: Any) -> HandlerError:
    return HandlerError(f"Invalid type for '{param}': expected {want}, but got {_got(value)} instead.", param=param)


def _number(data: dict[str, Any], name: str, default: Any, lo: float, hi: float) -> Any:
    v = data.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _type_error(name, "a decimal", v)
    if not lo <= v <= hi:
        side, bound = ("below minimum", f">= {lo:g}") if v < lo else ("above maximum", f"<= {hi:g}")
        msg = f"Invalid '{name}': decimal {side} value. Expected a value {bound}, but got {v} instead."
        raise HandlerError(msg, param=name)
    return float(v)


def _integer(data: dict[str, Any], name: str, lo: int | None = None) -> int | None:
    v = data.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer", v)
    if lo is not None and v < lo:
        msg = f"Invalid '{name}': integer below minimum value. Expected a value >= {lo}, but got {v} instead."
        raise HandlerError(msg, param=name)
    return v


def _typed(data: dict[str, Any], name: str, t: type, default: Any, param: str = "") -> Any:
    v = data.get(name)
    if v is None:
        return default
    if not isinstance(v, t) or (t is not bool and isinstance(v, bool)):
        raise _type_error(param or name, _TYPE_NAMES[t], v)
    return v


def parse_request(body: Buffer) -> ChatRequest:
    """Decode and validate a chat.completions request body.

    Unknown fields are ignored (clients send vendor extensions); fields that would change the answer
    in a way this server cannot honour (n > 1, logprobs, json_schema) are refused.

    Raises:
        HandlerError: the body is not JSON, or a field is missing, of the wrong type or out of range;
            `param` names the field (OpenAI's dotted form for messages, e.g. "messages.[0].role").
    """
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise HandlerError(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(data, dict):
        raise HandlerError("The request body must be a JSON object.")
    if (n := _integer(data, "n", 1)) not in (None, 1):
        raise HandlerError(f"Invalid 'n': this model generates one choice per request, got {n}.", param="n")
    if _typed(data, "logprobs", bool, False):
        raise HandlerError("'logprobs' is not supported by this model.", param="logprobs")
    _check_response_format(data.get("response_format"))
    stream = _typed(data, "stream", bool, False)
    options = _typed(data, "stream_options", dict, {})
    max_tokens = _integer(data, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens", 1)
    return ChatRequest(
        messages=_messages(data.get("messages")),
        model=_typed(data, "model", str, ""),
        stream=stream,
        include_usage=stream and _typed(options, "include_usage", bool, False, "stream_options.include_usage"),
        temperature=_number(data, "temperature", None, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0),
        max_tokens=max_tokens,
        stop=_stop(data.get("stop")),
        seed=_integer(data, "seed"),
        tools=_tools(data.get("tools"), data.get("tool_choice")),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        user=_typed(data, "user", str, ""),
    )


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    # json_object only asks the model for JSON (the prompt must say so too): accepted, not enforced.
    if kind not in ("text", "json_object"):
        raise HandlerError(
            f"Invalid 'response_format.type': {kind!r} is not supported; use 'text' or 'json_object'.",
            param="response_format.type",
        )


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", stop)
    if len(stops) > MAX_STOP:
        raise HandlerError(
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, "
            f"but got an array with length {len(stops)} instead.",
            param="stop",
        )
    return [s for s in stops if s]


def _messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise HandlerError("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise HandlerError("'messages' must be a non-empty array.", param="messages")
    return [_message(m, f"messages.[{i}]") for i, m in enumerate(messages)]


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise _type_error(where, "an object", m)
    role = m.get("role")
    if role not in ROLES:
        raise HandlerError(
            f"Invalid value for '{where}.role': expected one of {', '.join(sorted(ROLES))}, got {role!r}.",
            param=f"{where}.role",
        )
    content = _content(m.get("content"), f"{where}.content", optional=role == "assistant")
    # Chat templates know system/user/assistant/tool; "developer" is OpenAI's newer name for system.
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    if isinstance(name := m.get("name"), str):
        out["name"] = name
    if role == "assistant" and m.get("tool_calls"):
        out["tool_calls"] = _history_calls(m["tool_calls"], f"{where}.tool_calls")
    elif role == "assistant" and content is None:
        raise HandlerError(f"Missing required parameter: '{where}.content'.", param=f"{where}.content")
    if role == "tool":
        out["tool_call_id"] = _typed(m, "tool_call_id", str, None, f"{where}.tool_call_id")
        if out["tool_call_id"] is None:
            raise HandlerError(f"Missing required parameter: '{where}.tool_call_id'.", param=f"{where}.tool_call_id")
    return out


def _content(content: Any, where: str, optional: bool) -> str | None:
    if content is None:
        if optional:
            return None
        raise HandlerError(f"Missing required parameter: '{where}'.", param=where)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _type_error(where, "a string or an array of content parts", content)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise HandlerError(
                f"Invalid content part '{where}.[{i}]': this model accepts only text parts, got {kind!r}.",
                param=f"{where}.[{i}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)  # text-only models see the parts as one text, as vLLM joins them


def _history_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise _type_error(where, "an array", calls)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise HandlerError(f"Missing required parameter: '{where}.[{i}].function.name'.", param=f"{where}.[{i}]")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            # Templates (Qwen, Hermes) render arguments with `tojson`: give them the object, not its text.
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append({"id": call.get("id", ""), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _tools(tools: Any, choice: Any) -> list[dict[str, Any]]:
    if tools is None or choice == "none":
        return []
    if not isinstance(tools, list):
        raise _type_error("tools", "an array", tools)
    if len(tools) > MAX_TOOLS:
        raise HandlerError(f"Invalid 'tools': at most {MAX_TOOLS} tools are allowed.", param="tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function" or not isinstance(fn.get("name"), str):
            raise HandlerError(
                f"Invalid 'tools.[{i}]': expected {{'type': 'function', 'function': {{'name': ...}}}}.",
                param=f"tools.[{i}]",
            )
    if isinstance(choice, dict):  # a named function: offer only that one (the model is not forced to call it)
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise HandlerError(f"Invalid 'tool_choice': no tool named {name!r} in 'tools'.", param="tool_choice")
    elif choice not in (None, "auto", "required"):
        raise HandlerError(
            f"Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or an object, got {choice!r}.",
            param="tool_choice",
        )
    return cast(list[dict[str, Any]], tools)


# --------------------------------------------------------------------------- template
def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # As transformers does: jinja's own tojson HTML-escapes <, > and &, which a prompt must not see.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return time.strftime(fmt)


class ChatTemplate:
    """An HF-style chat template, compiled once per model, rendered per request."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        """Raises: jinja2.TemplateSyntaxError: the template does not compile."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.source = source
        self._template = env.from_string(source)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text.

        Raises:
            HandlerError: the template refused the conversation (raise_exception, e.g. roles that do not
                alternate) or failed on it.
        """
        try:
            return self._template.render(
                messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt, **self._tokens
            )
        except (TemplateError, TypeError, ValueError) as exc:
            raise HandlerError(f"The chat template cannot render these messages: {exc}", param="messages") from None


# --------------------------------------------------------------------------- responses
def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(14)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(
    completion_id: str,
    created: int,
    model: str,
    content: str,
    tool_calls: list[dict[str, Any]],
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    """A whole `chat.completion` object, encoded."""
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if tool_calls else "")}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    head = {"id": completion_id, "object": "chat.completion", "created": created, "model": model}
    return msgspec.json.encode({**head, "choices": [choice], "usage": _usage(prompt_tokens, completion_tokens)})


class ChunkEncoder:
    """The SSE events of one streamed completion, as OpenAI sends them. The parts that do not change are
    encoded once, so a token's event costs one small string encode and two concatenations."""

    __slots__ = ("_content_head", "_content_tail", "_delta_head", "_finish_tail", "_head", "_tail")

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool = False) -> None:
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._head = b"data: " + msgspec.json.encode(head)[:-1]  # the object, open for more fields
        usage_null = b',"usage":null' if include_usage else b""  # OpenAI: every chunk has it in that mode
        self._delta_head = self._head + b',"choices":[{"index":0,"delta":'
        self._tail = b',"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
        self._finish_tail = b"}]" + usage_null + b"}\n\n"
        self._content_head = self._delta_head + b'{"content":'
        self._content_tail = b"}" + self._tail

    def role(self) -> bytes:
        """The first event: the assistant's role and empty content."""
        return self._delta_head + b'{"role":"assistant","content":""}' + self._tail

    def content(self, text: str) -> bytes:
        return self._content_head + msgspec.json.encode(text) + self._content_tail

    def tool_calls(self, calls: list[dict[str, Any]], first_index: int) -> bytes:
        """The calls, each whole in one delta entry (OpenAI may split arguments; clients accept either)."""
        entries = [{"index": first_index + i, **call} for i, call in enumerate(calls)]
        return self._delta_head + msgspec.json.encode({"tool_calls": entries}) + self._tail

    def finish(self, reason: str) -> bytes:
        """The last choice event: an empty delta and the finish reason."""
        return (
            self._delta_head + b'{},"logprobs":null,"finish_reason":' + msgspec.json.encode(reason) + self._finish_tail
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """With stream_options.include_usage: the event after the finish, with no choices."""
        usage = msgspec.json.encode(_usage(prompt_tokens, completion_tokens))
        return self._head + b',"choices":[],"usage":' + usage + b"}\n\n"
