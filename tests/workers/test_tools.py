"""The `tools` handler (workers.tools): the example tools' answers, their argument checks against the
schemas they publish, the handler driven in-process on a recording link (answers, errors, the delay
running calls in parallel, a cancel during the delay), the loader, and one call through a worker and
the native HTTP route.

The expected answers are spelled out here by hand: the tool's contract is the oracle, not its table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from casola.wire import FLAG_END, Frame, FrameType, RequestMeta, ResponseMeta
from casola.worker.call import HandlerError, WorkCall
from workers.chat import parse_request
from workers.loader import build, describe, resolve
from workers.spec import ModelSpec, SpecError, read_manifest
from workers.tools import MAX_DELAY_MS, TOOL_SCHEMAS, ToolsModel, call_tool, openai_tools, run_tool


def spec(**options: Any) -> ModelSpec:
    return ModelSpec(name="tools", kind="tools", path=None, options=options)


def answer(tool: str, arguments: Any) -> Any:
    return msgspec.json.decode(run_tool(tool, json.dumps(arguments).encode()))


# --------------------------------------------------------------------------- get_weather
def test_weather_of_a_known_city() -> None:
    assert answer("get_weather", {"city": "Paris"}) == {"city": "Paris", "temperature_c": 18, "conditions": "sunny"}
    assert answer("get_weather", {"city": "London"}) == {
        "city": "London",
        "temperature_c": 12,
        "conditions": "light rain",
    }
    for spelled in ("paris", "  PARIS ", "Paris, France"):
        assert answer("get_weather", {"city": spelled})["city"] == "Paris"
    assert answer("get_weather", {"city": "new  york"})["city"] == "New York"
    for city in ("Tokyo", "Berlin", "Madrid", "Rome", "Sydney", "Cairo", "Moscow", "Toronto", "Mumbai"):
        doc = answer("get_weather", {"city": city})
        assert doc["city"] == city and isinstance(doc["temperature_c"], int) and doc["conditions"]


def test_an_unknown_city_is_an_answer_the_model_can_read() -> None:
    doc = answer("get_weather", {"city": "Atlantis"})
    assert doc["error"] == "No weather data for Atlantis." and doc["city"] == "Atlantis"
    assert "Paris" in doc["known_cities"] and len(doc["known_cities"]) >= 12
    assert "temperature_c" not in doc


# --------------------------------------------------------------------------- set_timer
@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (300, "5 minutes"),
        (1, "1 second"),
        (61, "1 minute and 1 second"),
        (3600, "1 hour"),
        (3661, "1 hour, 1 minute and 1 second"),
        (86400, "24 hours"),
    ],
)
def test_timer_confirmation(seconds: int, said: str) -> None:
    assert answer("set_timer", {"seconds": seconds}) == {
        "ok": True,
        "seconds": seconds,
        "label": None,
        "confirmation": f"Timer set for {said}.",
    }


def test_timer_label() -> None:
    doc = answer("set_timer", {"seconds": 300, "label": "tea"})
    assert doc == {"ok": True, "seconds": 300, "label": "tea", "confirmation": 'Timer "tea" set for 5 minutes.'}
    assert answer("set_timer", {"seconds": 300, "label": None})["label"] is None  # null optional: absent


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("tool", "body", "param", "message"),
    [
        (
            "launch_rockets",
            b'{"count": 3}',
            "tool",
            "unknown tool 'launch_rockets': the tools are get_weather, set_timer",
        ),
        ("", b"{}", "tool", "the parameter 'tool' is required: one of get_weather, set_timer"),
        ("get_weather", b'{"city": 42}', "city", "get_weather: parameter 'city' must be a string, got integer 42"),
        ("get_weather", b"{}", "city", "get_weather: missing required parameter 'city'"),
        ("get_weather", b"", "city", "get_weather: missing required parameter 'city'"),
        ("get_weather", b'{"city": null}', "city", "get_weather: parameter 'city' must be a string, got null"),
        ("get_weather", b'{"city": ""}', "city", "get_weather: parameter 'city' must have at least 1 characters"),
        ("get_weather", b'{"city": "Paris", "units": "F"}', "units", "get_weather: unknown parameter 'units'"),
        ("get_weather", b'["Paris"]', "arguments", "get_weather: the arguments must be a JSON object, got array"),
        ("get_weather", b'{"city": "Par', "arguments", "get_weather: the arguments are not valid JSON"),
        ("set_timer", b'{"seconds": 0}', "seconds", "set_timer: parameter 'seconds' must be at least 1, got 0"),
        ("set_timer", b'{"seconds": 86401}', "seconds", "set_timer: parameter 'seconds' must be at most 86400"),
        (
            "set_timer",
            b'{"seconds": "300"}',
            "seconds",
            "set_timer: parameter 'seconds' must be an integer, got string",
        ),
        ("set_timer", b'{"seconds": 2.5}', "seconds", "set_timer: parameter 'seconds' must be an integer, got number"),
        (
            "set_timer",
            b'{"seconds": true}',
            "seconds",
            "set_timer: parameter 'seconds' must be an integer, got boolean",
        ),
        ("set_timer", b'{"seconds": 5, "label": 7}', "label", "set_timer: parameter 'label' must be a string"),
        ("set_timer", b'{"label": "tea"}', "seconds", "set_timer: missing required parameter 'seconds'"),
    ],
)
def test_bad_calls_are_refused(tool: str, body: bytes, param: str, message: str) -> None:
    with pytest.raises(HandlerError) as info:
        run_tool(tool, body)
    assert info.value.message.startswith(message) and info.value.param == param
    assert info.value.code == HandlerError("x").code  # BAD_REQUEST


def test_call_tool_takes_decoded_arguments() -> None:
    assert call_tool("get_weather", {"city": "Rome"})["city"] == "Rome"
    with pytest.raises(HandlerError, match="get_weather: the arguments must be a JSON object, got string"):
        call_tool("get_weather", '{"city": "Rome"}')


# --------------------------------------------------------------------------- schemas
def test_schemas_are_openai_function_schemas() -> None:
    assert set(TOOL_SCHEMAS) == {"get_weather", "set_timer"}
    for name, fn in TOOL_SCHEMAS.items():
        assert fn["name"] == name and fn["description"]
        params = fn["parameters"]
        assert params["type"] == "object" and params["additionalProperties"] is False
        assert set(params["required"]) <= set(params["properties"])
        assert all(p["description"] for p in params["properties"].values())
    assert TOOL_SCHEMAS["get_weather"]["parameters"]["required"] == ["city"]
    assert TOOL_SCHEMAS["set_timer"]["parameters"]["properties"]["seconds"] | {"description": ""} == {
        "type": "integer",
        "minimum": 1,
        "maximum": 86400,
        "description": "",
    }


def test_openai_tools_is_a_chat_request_tools_list() -> None:
    tools = openai_tools()
    assert [t["function"]["name"] for t in tools] == ["get_weather", "set_timer"]
    assert all(t["type"] == "function" for t in tools)
    req = parse_request(json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": tools}).encode())
    assert req.tools == tools
    weather = openai_tools("get_weather")
    weather[0]["function"]["parameters"]["required"].clear()  # a copy: the published schema stays
    assert TOOL_SCHEMAS["get_weather"]["parameters"]["required"] == ["city"]
    with pytest.raises(KeyError):
        openai_tools("launch_rockets")


# --------------------------------------------------------------------------- the handler, in-process
class RecordingLink:
    """What WorkCall needs of a link, recording the frames it is given; `open` False: the stream is gone."""

    def __init__(self) -> None:
        self.conn = self
        self.frames: list[Frame] = []
        self.open = True

    def send(self, frame: Frame) -> None:
        self.frames.append(frame)

    def is_open(self, sid: int) -> bool:
        return self.open

    def flush_soon(self) -> None:
        pass

    async def drain(self) -> None:
        pass


def work_call(tool: str, body: bytes, sid: int = 1) -> tuple[WorkCall, RecordingLink]:
    link = RecordingLink()
    meta = RequestMeta(model="tools", content_type="application/json", params={"tool": tool})
    call = WorkCall(link, sid, Frame(FrameType.REQUEST, sid, meta, body, FLAG_END))  # type: ignore[arg-type]
    return call, link


def only_answer(link: RecordingLink) -> Any:
    (frame,) = link.frames
    assert frame.type is FrameType.RESPONSE and frame.end
    assert isinstance(frame.meta, ResponseMeta) and frame.meta.content_type == "application/json"
    return msgspec.json.decode(frame.payload)


def test_handler_answers_json() -> None:
    model = ToolsModel(spec())
    call, link = work_call("get_weather", b'{"city": "Tokyo"}')
    asyncio.run(model(call))
    assert only_answer(link) == {"city": "Tokyo", "temperature_c": 22, "conditions": "cloudy"}
    assert call.finished


def test_handler_refuses_before_answering() -> None:
    model = ToolsModel(spec(delay_ms=5000))
    call, link = work_call("get_weather", b'{"city": 42}')
    t0 = time.perf_counter()
    with pytest.raises(HandlerError, match="parameter 'city'"):
        asyncio.run(model(call))
    assert time.perf_counter() - t0 < 1  # refused at once, not after the delay
    assert link.frames == []  # the runtime turns the error into an ERROR frame


def test_delayed_calls_run_in_parallel() -> None:
    model = ToolsModel(spec(delay_ms=200))
    calls = [work_call("get_weather", json.dumps({"city": c}).encode(), i + 1) for i, c in enumerate(["Paris", "Rome"])]

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(model(call) for call, _ in calls))
        return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    assert 0.2 <= elapsed < 0.38, f"two 200 ms calls took {elapsed:.3f} s"
    assert [only_answer(link)["city"] for _, link in calls] == ["Paris", "Rome"]


def test_cancel_during_the_delay() -> None:
    model = ToolsModel(spec(delay_ms=10_000))
    call, link = work_call("set_timer", b'{"seconds": 60}')

    async def main() -> float:
        task = asyncio.create_task(model(call))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 0.1
    assert link.frames == [] and not call.finished


@pytest.mark.parametrize("bad", [-1, "soon", True, float("nan"), MAX_DELAY_MS + 1, None])
def test_bad_delay_fails_at_load(bad: Any) -> None:
    with pytest.raises(SpecError, match="delay_ms"):
        ToolsModel(spec(delay_ms=bad))


# --------------------------------------------------------------------------- loader and set
def test_the_tiny_set_has_a_tools_model(models_dir: Path) -> None:
    manifest = read_manifest(models_dir / "tools")
    assert manifest["kind"] == "tools" and manifest["files"] == {} and manifest["options"] == {}
    assert [p.name for p in (models_dir / "tools").iterdir()] == ["casola.json"]
    resolved = resolve("tools", models_dir)
    assert resolved.kind == "tools" and describe(resolved)["kind"] == "tools"
    model = build(dataclasses.replace(resolved, options={"delay_ms": 25}))
    assert isinstance(model, ToolsModel) and model.name == "tools" and model.delay == 0.025


# --------------------------------------------------------------------------- through a worker
def test_through_a_worker_and_the_native_route(tmp_path: Path, models_dir: Path) -> None:
    from casola.worker import WorkerConfig, WorkerRuntime
    from tests.e2e.stack import HttpClient, Stack, run_uvloop

    model = build(resolve("tools", models_dir))

    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt = WorkerRuntime(WorkerConfig(queue=[stack.queue_addr], capacity=2), [model], stack.worker_key)
        await rt.start()
        await rt.wait_registered()
        await stack.wait_workers(1, "tools")
        client = await HttpClient.connect(stack.http_port)
        head = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
        r = await client.request(
            "POST", "/v1/run/tools", b'{"seconds": 90}', {**head, "X-Casola-Param-Tool": "set_timer"}
        )
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        assert msgspec.json.decode(r.body)["confirmation"] == "Timer set for 1 minute and 30 seconds."
        bad = await client.request(
            "POST", "/v1/run/tools", b'{"city": 42}', {**head, "X-Casola-Param-Tool": "get_weather"}
        )
        assert bad.status == 400
        error = msgspec.json.decode(bad.body)["error"]
        assert error["param"] == "city" and "get_weather" in error["message"]
        await client.close()
        await rt.stop()
        await stack.stop()

    run_uvloop(main)
