"""`[workflows.<name>]` is checked when the config loads, and every error names the step or tool."""

from __future__ import annotations

from pathlib import Path

import pytest

from casola.config import ConfigError, load_config

GOOD = """
[[workers]]
models = ["echo"]

[workflows.agent]
deadline_ms = 5000
steps = [
  { name = "asr", kind = "model", model = "asr" },
  { name = "think", kind = "llm", model = "chat", tools = ["get_weather"] },
  { name = "split", kind = "sentences" },
  { name = "speak", kind = "model", model = "tts" },
]

[workflows.agent.tools.get_weather]
model = "tools"
description = "The weather in a city"
parameters = { type = "object", properties = { city = { type = "string" } }, required = ["city"] }
"""


def _load(tmp_path: Path, text: str) -> object:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p)


def test_a_valid_workflow_loads(tmp_path: Path) -> None:
    config = _load(tmp_path, GOOD)
    assert [s.name for s in config.workflows["agent"].steps] == ["asr", "think", "split", "speak"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('kind = "sentences"', 'kind = "sentencez"'), "step 'split': kind must be one of"),
        (('tools = ["get_weather"]', 'tools = ["get_wether"]'), "step 'think': tool 'get_wether' is not declared"),
        (
            ('{ name = "asr", kind = "model", model = "asr" }', '{ name = "asr", kind = "model" }'),
            "step 'asr': a model step names its model",
        ),
        (('name = "speak"', 'name = "asr"'), "step 'asr': two steps have this name"),
        (
            ('model = "tools"', 'model = "tools"\nurl = "https://x.example/t"'),
            "tool 'get_weather': give exactly one of",
        ),
        (
            ('type = "object", properties', 'type = "objekt", properties'),
            "tool 'get_weather': parameters is not a JSON schema",
        ),
        (
            ('{ name = "think", kind = "llm", model = "chat", tools = ["get_weather"] },', ""),
            "step 'split': a sentences step follows an llm step",
        ),
        (("[workflows.agent]", "[workflows.echo]"), "workflow 'echo': a served model has the same name"),
        (
            ("deadline_ms = 5000", "deadline_ms = 5000\nrealtime = { max_sessions_per_tenant = -1 }"),
            "workflow 'agent': realtime.max_sessions_per_tenant must be >= 0",
        ),
    ],
)
def test_a_bad_declaration_is_refused_naming_the_step(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = GOOD.replace(*change)
    if change[0] == "[workflows.agent]":
        text = text.replace("[workflows.agent.tools", "[workflows.echo.tools")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _load(tmp_path, text)


def test_an_unknown_key_in_a_step_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lookahaed"):
        _load(tmp_path, GOOD.replace('kind = "sentences" }', 'kind = "sentences", lookahaed = 3 }'))


def test_the_documented_and_example_workflows_load(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "workflows.md").read_text()
    block = doc.split("```toml", 1)[1].split("```", 1)[0]
    assert [s.name for s in _load(tmp_path, block).workflows["voice-agent"].steps] == ["asr", "think", "split", "speak"]  # type: ignore[attr-defined]
    example = load_config(root / "examples" / "voice-agent.toml")
    think = example.workflows["voice-agent"].steps[1]
    assert (think.model, think.tools, think.max_rounds, think.tool_results) == (
        "agent",
        ["get_weather", "set_timer"],
        1,
        "text",
    )


def test_a_tool_checks_its_arguments_against_its_schema_and_may_prune_undeclared_ones() -> None:
    from casola.flow.spec import ToolConfig
    from casola.flow.tools import Tool
    from casola.net.outbound import OutboundPolicy

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tool = Tool("get_weather", ToolConfig(model="tools", parameters=schema), OutboundPolicy())
    assert tool.check('{"city": "Paris"}') == (b'{"city":"Paris"}', "")
    assert "42 is not of type 'string'" in tool.check('{"city": 42}')[1]
    assert "not JSON" in tool.check("{city: Paris}")[1]
    copied = '{"city": "Paris", "required": ["city"]}'  # what a 0.5B model writes
    assert "Additional properties" in tool.check(copied)[1]
    assert tool.check(copied, prune=True) == (b'{"city":"Paris"}', "")
    assert "'city' is a required property" in tool.check('{"town": "Paris"}', prune=True)[1]


def test_an_http_tool_is_held_to_the_webhook_address_rules() -> None:
    import asyncio

    from casola.flow.frontdoor import FrontDoor
    from casola.flow.run import Run, StepFailed
    from casola.flow.spec import ToolConfig
    from casola.flow.tools import Tool
    from casola.net.outbound import OutboundPolicy
    from casola.wire import RequestMeta

    async def call(url: str) -> str:
        tool = Tool("t", ToolConfig(url=url), OutboundPolicy())  # no outbound_allow
        run = Run("wf", RequestMeta("wf"), 0, ["t"], FrontDoor(None, "test"))  # type: ignore[arg-type]
        try:
            await tool.call(run, "t", b"{}")
        except StepFailed as exc:
            return exc.message
        finally:
            await tool.aclose()
        return "ran"

    for url in ("http://127.0.0.1:9/t", "http://10.0.0.1/t", "http://[::1]/t", "http://169.254.169.254/latest"):
        msg = asyncio.run(call(url))
        assert msg.startswith("workflow 'wf': tool 't': ") and "refused" in msg.lower(), (url, msg)
