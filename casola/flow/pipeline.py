"""A workflow's steps as one streaming pipeline (casola.flow.stages), from any step on.

Both a workflow run (casola.flow.engine) and a realtime session's turn (casola.realtime.turn) build
theirs here: the session starts at its `llm` step (its listen stream did the ASR) and taps the
`sentences` step's output (what the agent says, sentence by sentence, for the transcript and the
history).
"""

from __future__ import annotations

from collections.abc import Callable

from casola.flow.llm import LlmStage
from casola.flow.run import Run
from casola.flow.spec import StepConfig, WorkflowConfig
from casola.flow.stages import Kept, ModelStage, PerSentence, Sentences, Source
from casola.flow.tools import Tool, tool_stage

__all__ = ["Checkpointer", "Tap", "build_pipeline"]

# (step index) -> what Kept calls with the step's output once it completes (an async run's checkpoint)
Checkpointer = Callable[[int], Callable[..., object]]
# (step, its output) -> the source the next step reads (the same items, observed)
Tap = Callable[[StepConfig, Source], Source]


def build_pipeline(
    run: Run,
    config: WorkflowConfig,
    tools: dict[str, Tool],
    src: Source,
    start: int = 0,
    *,
    checkpoint: Checkpointer | None = None,
    tap: Tap | None = None,
) -> Source:
    """The pipeline of `config.steps[start:]` reading `src`; its last stage's output is the answer."""
    steps = config.steps
    for i in range(start, len(steps)):
        step = steps[i]
        src = _stage(run, step, steps[i - 1] if i else None, src, tools)
        if tap is not None:
            src = tap(step, src)
        if checkpoint is not None and i < len(steps) - 1:
            src = Kept(step.name, src, checkpoint(i))  # type: ignore[arg-type]
    return src


def _stage(run: Run, step: StepConfig, before: StepConfig | None, src: Source, tools: dict[str, Tool]) -> Source:
    kind = step.kind
    if kind == "model":
        if before is not None and before.kind == "sentences":
            return PerSentence(run, step, src, before.filter)
        return ModelStage(run, step, src)
    if kind == "llm":
        return LlmStage(run, step, tools, src)
    if kind == "tool":
        return tool_stage(run, step, tools[step.tool], src)
    return Sentences(step, src)
