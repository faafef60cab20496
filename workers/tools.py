"""The `tools` handler: example tools for a workflow's LLM to call, answered from fixed local data (no network).

Contract (`POST /v1/run/<model>` with `X-Casola-Param-Tool: get_weather`, or a REQUEST frame): the parameter
`tool` names the tool; the body is its arguments, a JSON object (application/json): the `function.arguments`
of an OpenAI tool call, as the model wrote them. The answer is the tool's result, a JSON object
(application/json), for the model to read as the content of the tool message:

    get_weather(city)           {"city": "Paris", "temperature_c": 18, "conditions": "sunny"}
                                a city not in the table: {"error": "No weather data for Atlantis.",
                                "city": "Atlantis", "known_cities": [...]}, an answer the model can relay
    set_timer(seconds, label?)  {"ok": true, "seconds": 300, "label": "tea",
                                "confirmation": "Timer \\"tea\\" set for 5 minutes."}
                                (label null when none is given; the timer never fires)

An unknown tool, a body that is not a JSON object, or arguments outside the tool's schema raise HandlerError
(BAD_REQUEST): the message names the tool and the parameter, and `param` is the parameter (`tool` for an
unknown tool, `arguments` for a body that is not a JSON object). Arguments are checked against TOOL_SCHEMAS,
each tool's OpenAI function schema (name, description, JSON-schema parameters), which configs and docs
offer the model as they are (`openai_tools()` is the chat.completions `tools` list). A null optional
argument counts as absent, as OpenAI's strict mode sends one.

Manifest options (casola.json "options"):

    delay_ms   wait this long before answering (asyncio: no thread held, and a CANCEL ends the wait), a tool
               that takes time for tests (calls in parallel, cancellation); default 0
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any, Final

import msgspec

from casola.wire import Buffer
from casola.worker.call import HandlerError, WorkCall
from casola.worker.model import param_str
from workers.spec import ModelSpec, SpecError

__all__ = ["CITIES", "MAX_DELAY_MS", "TOOL_SCHEMAS", "ToolsModel", "call_tool", "openai_tools", "run_tool"]

# A test knob: a longer wait is a misconfiguration (the ingress's default deadline is far shorter).
MAX_DELAY_MS: Final = 600_000

# city -> (temperature in °C, conditions); fixed, so answers are reproducible.
CITIES: Final[dict[str, tuple[int, str]]] = {
    "Paris": (18, "sunny"),
    "London": (12, "light rain"),
    "Tokyo": (22, "cloudy"),
    "New York": (15, "partly cloudy"),
    "Berlin": (14, "overcast"),
    "Madrid": (26, "sunny"),
    "Rome": (24, "clear"),
    "Sydney": (20, "windy"),
    "Cairo": (33, "hot and dry"),
    "Moscow": (3, "light snow"),
    "Toronto": (9, "foggy"),
    "Mumbai": (31, "humid"),
}

TOOL_SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    "get_weather": {
        "name": "get_weather",
        "description": "Get the current weather in a city: temperature in degrees Celsius and conditions.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris", "minLength": 1, "maxLength": 100}
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "set_timer": {
        "name": "set_timer",
        "description": "Set a countdown timer.",
        "parameters": {
            "type": "object",
            "properties": {
                "seconds": {
                    "type": "integer",
                    "description": "How long the timer runs, in seconds (at most a day)",
                    "minimum": 1,
                    "maximum": 86400,
                },
                "label": {"type": "string", "description": "What the timer is for, e.g. tea", "maxLength": 100},
            },
            "required": ["seconds"],
            "additionalProperties": False,
        },
    },
}


def openai_tools(*names: str) -> list[dict[str, Any]]:
    """The chat.completions `tools` list for the named tools (all of them when none are named); a copy.

    Raises:
        KeyError: a name that is not a tool here.
    """
    return [{"type": "function", "function": copy.deepcopy(TOOL_SCHEMAS[n])} for n in names or TOOL_SCHEMAS]


# --------------------------------------------------------------------------- arguments
_JSON_NAMES: Final = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"  # what else JSON decodes to


def _problem(schema: dict[str, Any], value: Any) -> str:
    """What is wrong with one argument under its property schema ("" when nothing)."""
    want, got = schema["type"], _json_type(value)
    if got != want and not (want == "number" and got == "integer"):
        return f"must be {_JSON_NAMES[want]}, got {got} {msgspec.json.encode(value).decode()[:40]}"
    if "minimum" in schema and value < schema["minimum"]:
        return f"must be at least {schema['minimum']}, got {value}"
    if "maximum" in schema and value > schema["maximum"]:
        return f"must be at most {schema['maximum']}, got {value}"
    if "minLength" in schema and len(value) < schema["minLength"]:
        return f"must have at least {schema['minLength']} characters"
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return f"must have at most {schema['maxLength']} characters, got {len(value)}"
    return ""


def _check(tool: str, arguments: Any) -> dict[str, Any]:
    """`args` if they fit the tool's parameter schema, without null optional ones.

    Raises:
        HandlerError: not an object, a missing or unknown parameter, or one of the wrong type or range.
    """
    schema = TOOL_SCHEMAS[tool]["parameters"]
    if not isinstance(arguments, dict):
        got = _json_type(arguments)
        raise HandlerError(f"{tool}: the arguments must be a JSON object, got {got}", param="arguments")
    props, required = schema["properties"], schema["required"]
    args: dict[str, Any] = {k: v for k, v in arguments.items() if v is not None or k in required}
    for name in required:
        if name not in args:
            raise HandlerError(f"{tool}: missing required parameter '{name}'", param=name)
    for name, value in args.items():
        if name not in props:
            raise HandlerError(f"{tool}: unknown parameter '{name}' (it takes {', '.join(props)})", param=name)
        if problem := _problem(props[name], value):
            raise HandlerError(f"{tool}: parameter '{name}' {problem}", param=name)
    return args


# --------------------------------------------------------------------------- the tools
_BY_KEY: Final = {name.casefold(): name for name in CITIES}


def _get_weather(args: dict[str, Any]) -> dict[str, Any]:
    city: str = args["city"]
    key = " ".join(city.split(",")[0].split()).casefold()  # "  paris, France" is Paris
    name = _BY_KEY.get(key)
    if name is None:
        return {"error": f"No weather data for {city}.", "city": city, "known_cities": list(CITIES)}
    temperature, conditions = CITIES[name]
    return {"city": name, "temperature_c": temperature, "conditions": conditions}


def _duration(seconds: int) -> str:
    """300 -> "5 minutes", 3661 -> "1 hour, 1 minute and 1 second"."""
    parts = []
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _set_timer(args: dict[str, Any]) -> dict[str, Any]:
    seconds: int = args["seconds"]
    label: str | None = args.get("label")
    named = f' "{label}"' if label else ""
    confirmation = f"Timer{named} set for {_duration(seconds)}."
    return {"ok": True, "seconds": seconds, "label": label, "confirmation": confirmation}


_TOOLS: Final[dict[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "get_weather": _get_weather,
    "set_timer": _set_timer,
}


def _lookup(tool: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    run = _TOOLS.get(tool)
    if run is None:
        known = ", ".join(_TOOLS)
        if not tool:
            raise HandlerError(f"the parameter 'tool' is required: one of {known}", param="tool")
        raise HandlerError(f"unknown tool {tool!r}: the tools are {known}", param="tool")
    return run


def call_tool(tool: str, arguments: Any) -> dict[str, Any]:
    """The result of calling `tool` with `arguments` (decoded JSON).

    Raises:
        HandlerError: an unknown tool (param "tool"), or arguments outside its schema (param: the parameter).
    """
    return _lookup(tool)(_check(tool, arguments))


def run_tool(tool: str, body: Buffer) -> bytes:
    """The JSON answer to a request for `tool` whose body is the arguments (empty: no arguments).

    Raises:
        HandlerError: as `call_tool`, or a body that is not JSON (param "arguments").
    """
    run = _lookup(tool)
    try:
        arguments = msgspec.json.decode(body) if len(body) else {}
    except msgspec.DecodeError as exc:
        raise HandlerError(f"{tool}: the arguments are not valid JSON: {exc}", param="arguments") from None
    return msgspec.json.encode(run(_check(tool, arguments)))


class ToolsModel:
    """The example tools as a worker model. Async: a call holds no thread, and a CANCEL ends it at once."""

    def __init__(self, spec: ModelSpec) -> None:
        """Raises: SpecError: a `delay_ms` that is not a number in 0..MAX_DELAY_MS."""
        self.name = spec.name
        raw = spec.options.get("delay_ms", 0)
        try:
            delay = float(raw) if not isinstance(raw, bool) else -1.0
        except (TypeError, ValueError):
            delay = -1.0
        if not 0 <= delay <= MAX_DELAY_MS:  # also refuses NaN
            raise SpecError(f"model {spec.name!r}: option delay_ms must be 0..{MAX_DELAY_MS} ms, not {raw!r}")
        self.delay = delay / 1000

    async def __call__(self, call: WorkCall) -> None:
        """Answers one tool call; a bad one is refused before any wait.

        Raises:
            HandlerError: an unknown tool or invalid arguments (see `run_tool`).
            asyncio.CancelledError: the request was cancelled during the wait.
        """
        answer = run_tool(param_str(call.params, "tool"), await call.body())
        if self.delay:
            await asyncio.sleep(self.delay)
        call.respond(answer, "application/json")
