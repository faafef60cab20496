"""What a workflow is: `[workflows.<name>]` in the TOML config (docs/workflows.md), checked at load.

A workflow is a pipeline of steps; each step takes what the one before produced (the first takes
the workflow's input) and the last step's output is the answer:

- `model`: one request to a served model, its input the previous output (whole), its output passed
  on as it streams. After a `sentences` step it runs once per sentence (fan-in: TTS per sentence),
  up to `lookahead` at once, the outputs joined into one stream in order.
- `llm`: a chat completion (the `llm` worker kind's OpenAI body) on the previous output as the
  user's message, streamed as text deltas; the model's tool calls run as the tools named in
  `tools`, in parallel, their results go back as messages, for up to `max_rounds` rounds.
- `tool`: one of the workflow's `[workflows.<name>.tools.<tool>]`, on the previous output (JSON
  arguments).
- `sentences`: text deltas to whole sentences, each emitted the moment it is complete.

Every problem is reported naming the workflow and the step (`WorkflowError`).
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

__all__ = [
    "KINDS",
    "RealtimeConfig",
    "StepConfig",
    "ToolConfig",
    "WorkflowConfig",
    "WorkflowError",
    "check_workflows",
    "describe",
]

KINDS: Final = ("model", "llm", "tool", "sentences")
TOOL_RESULTS: Final = ("messages", "text")
ON_REJECTED: Final = ("tell", "answer")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_STEPS: Final = 32


class WorkflowError(ValueError):
    """A workflow declaration that cannot run: the message names the workflow and the step."""


class ToolConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[workflows.<name>.tools.<tool>]`: a tool an `llm` step may call, or a `tool` step runs."""

    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})
    model: str = ""  # a worker model that runs it: params {"tool": <name>}, body = the arguments (JSON)
    url: str = ""  # or an HTTP endpoint: POST of the arguments (JSON), held to the webhook address rules
    timeout_ms: int = 10000
    # A field of the tool's JSON result that IS the answer (an action's templated confirmation): when
    # every call of a round has one, the llm step answers with them and the model is not asked again.
    answer: str = ""


class StepConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    kind: str
    model: str = ""  # model, llm
    params: dict[str, Any] = {}  # model: REQUEST params; llm: merged into the chat body (max_tokens, ...)
    content_type: str = ""  # model: the request's content type (default: the previous output's)
    lookahead: int = 2  # model after sentences: sentences in flight at once
    # llm
    system: str = ""
    tools: list[str] = []
    max_rounds: int = 2  # rounds whose tool calls are run; the round after the last has no tools
    max_calls: int = 8  # tool calls run from one answer (in parallel); more are refused
    tool_results: str = "messages"  # messages (role "tool") | text (one user message: small models loop on tool turns)
    grounded: bool = (
        False  # a call's required string arguments must occur in the user's words (small models make them up)
    )
    on_rejected: str = "tell"  # tell: the model gets why (a tool message); answer: asked again, no tools
    prune_arguments: bool = False  # drop arguments the schema does not declare (small models copy "required" in)
    # tool
    tool: str = ""
    # sentences
    min_chars: int = 12  # a sentence shorter than this is not ended ("Dr.", "No.")
    max_chars: int = 300  # a run this long without an ending is cut at its last clause mark or space
    max_wait_ms: int = 250  # an ending at the very end of the text so far: emitted if nothing follows within this
    filter: bool = False  # classify each sentence, racing the next step; a violating one is never passed on


class RealtimeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[workflows.<name>.realtime]`: how a realtime session holds a conversation with this workflow
    (docs/realtime.md). Its turns run the steps from the first `llm` step on; what comes before it
    (ASR) is the `listen` stream's job."""

    listen: str = "listen"  # the `listen` model: VAD, utterances and transcripts of the session's audio
    params: dict[str, Any] = {}  # its stream's defaults (silence_ms, min_speech_ms, threshold, language, ...)
    asr: str = ""  # transcribes a committed buffer when server VAD is off (default: the model step before the llm)
    max_items: int = 64  # conversation items kept (user and agent); the oldest go first
    max_buffer_ms: int = 60000  # audio a manual-commit session may hold uncommitted
    voice: str = ""  # the TTS step's voice when the session names none
    # Sessions of this workflow one tenant may hold at once (each holds a slot for as long as it
    # lasts); 0: half the workflow's max_concurrent, at least 1, so one tenant cannot lock out the rest.
    max_sessions_per_tenant: int = 0

    def tenant_share(self, max_concurrent: int) -> int:
        return self.max_sessions_per_tenant or max(1, max_concurrent // 2)


class WorkflowConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    steps: list[StepConfig]
    description: str = ""
    deadline_ms: int = 0  # the whole workflow's, when the request names none; 0 = none
    max_concurrent: int = 64  # runs at once: its slots at the queue node; more wait in line, per tenant
    tools: dict[str, ToolConfig] = {}
    realtime: RealtimeConfig = msgspec.field(default_factory=RealtimeConfig)


def check_workflows(workflows: dict[str, WorkflowConfig], models: set[str] | None = None) -> None:
    """Raise WorkflowError for the first problem in any declaration. `models`, when known: names a
    worker serves, which a workflow may not take for itself.

    Raises:
        WorkflowError: naming the workflow, and the step or tool.
    """
    for name, wf in workflows.items():
        where = f"workflow {name!r}"
        if not _NAME.fullmatch(name):
            raise WorkflowError(f"{where}: a name is 1-64 letters, digits, '.', '_' or '-'")
        if models is not None and name in models:
            raise WorkflowError(f"{where}: a served model has the same name")
        if not 1 <= len(wf.steps) <= MAX_STEPS:
            raise WorkflowError(f"{where}: needs 1..{MAX_STEPS} steps, has {len(wf.steps)}")
        if wf.deadline_ms < 0 or wf.max_concurrent < 1:
            raise WorkflowError(f"{where}: deadline_ms must be >= 0 and max_concurrent >= 1")
        if wf.realtime.max_sessions_per_tenant < 0:
            raise WorkflowError(f"{where}: realtime.max_sessions_per_tenant must be >= 0 (0: half of max_concurrent)")
        for tname, tool in wf.tools.items():
            _check_tool(f"{where} tool {tname!r}", tname, tool)
        seen: set[str] = set()
        for i, step in enumerate(wf.steps):
            at = f"{where} step {step.name!r}"
            if step.name in seen:
                raise WorkflowError(f"{at}: two steps have this name")
            seen.add(step.name)
            if not _NAME.fullmatch(step.name):
                raise WorkflowError(f"{where} step #{i + 1}: a name is 1-64 letters, digits, '.', '_' or '-'")
            _check_step(at, step, wf, wf.steps[i - 1] if i else None)


def _check_step(at: str, step: StepConfig, wf: WorkflowConfig, before: StepConfig | None) -> None:
    if step.kind not in KINDS:
        raise WorkflowError(f"{at}: kind must be one of {', '.join(KINDS)}, not {step.kind!r}")
    if step.kind in ("model", "llm") and not step.model:
        raise WorkflowError(f"{at}: a {step.kind} step names its model")
    if step.kind == "llm":
        for t in step.tools:
            if t not in wf.tools:
                known = ", ".join(wf.tools) or "none"
                raise WorkflowError(f"{at}: tool {t!r} is not declared ([workflows.*.tools]; declared: {known})")
        if not 1 <= step.max_rounds <= 16 or not 1 <= step.max_calls <= 64:
            raise WorkflowError(f"{at}: max_rounds must be 1..16 and max_calls 1..64")
        if step.on_rejected not in ON_REJECTED:
            raise WorkflowError(f"{at}: on_rejected must be one of {', '.join(ON_REJECTED)}")
        if step.tool_results not in TOOL_RESULTS:
            raise WorkflowError(f"{at}: tool_results must be one of {', '.join(TOOL_RESULTS)}")
    if step.kind == "tool" and step.tool not in wf.tools:
        raise WorkflowError(f"{at}: a tool step names a declared tool (tool = {step.tool!r})")
    if step.kind == "sentences":
        if before is None or before.kind != "llm":
            raise WorkflowError(f"{at}: a sentences step follows an llm step")
        if not 1 <= step.min_chars <= step.max_chars or step.max_wait_ms < 0:
            raise WorkflowError(f"{at}: needs 1 <= min_chars <= max_chars and max_wait_ms >= 0")
    if step.kind == "model" and not 1 <= step.lookahead <= 16:
        raise WorkflowError(f"{at}: lookahead must be 1..16")
    if before is not None and before.kind == "sentences" and step.kind != "model":
        raise WorkflowError(f"{at}: what follows a sentences step is a model step (run per sentence)")


def _check_tool(at: str, name: str, tool: ToolConfig) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not _NAME.fullmatch(name):
        raise WorkflowError(f"{at}: a name is 1-64 letters, digits, '.', '_' or '-'")
    if bool(tool.model) == bool(tool.url):
        raise WorkflowError(f"{at}: give exactly one of model (a worker model) and url (an HTTP endpoint)")
    if tool.url:
        from casola.net.outbound import OutboundError, parse_url

        try:
            parse_url(tool.url)
        except OutboundError as exc:
            raise WorkflowError(f"{at}: url: {exc}") from None
    if not 1 <= tool.timeout_ms <= 600_000:
        raise WorkflowError(f"{at}: timeout_ms must be 1..600000")
    try:
        Draft202012Validator.check_schema(tool.parameters)
    except SchemaError as exc:
        raise WorkflowError(f"{at}: parameters is not a JSON schema: {exc.message}") from None
    if tool.parameters.get("type") != "object":
        raise WorkflowError(f"{at}: parameters must be a JSON schema of type object (the call's arguments)")


def describe(name: str, config: WorkflowConfig) -> dict[str, Any]:
    """What `GET /v1/workflows` and `casola workflows list` show of one workflow."""
    return {
        "name": name,
        "description": config.description,
        "deadline_ms": config.deadline_ms,
        "max_concurrent": config.max_concurrent,
        "steps": [_describe_step(s) for s in config.steps],
        "tools": {t: {"description": c.description, "parameters": c.parameters} for t, c in config.tools.items()},
    }


def _describe_step(step: StepConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": step.name, "kind": step.kind}
    if step.model:
        out["model"] = step.model
    if step.kind == "llm":
        out["tools"] = list(step.tools)
    if step.kind == "tool":
        out["tool"] = step.tool
    return out
