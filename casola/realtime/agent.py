"""What a realtime session holds a conversation with: one declared workflow, as the engine serves it."""

from __future__ import annotations

import dataclasses

from casola.flow.frontdoor import FrontDoor
from casola.flow.spec import RealtimeConfig, WorkflowConfig
from casola.flow.tools import Tool
from casola.realtime.timing import TurnStats

__all__ = ["Agent", "turn_start"]


def turn_start(config: WorkflowConfig) -> int:
    """The step a turn starts at: the first `llm` step (-1: none, no conversation to hold)."""
    return next((i for i, s in enumerate(config.steps) if s.kind == "llm"), -1)


@dataclasses.dataclass(slots=True)
class Agent:
    name: str
    config: WorkflowConfig
    tools: dict[str, Tool]
    door: FrontDoor
    stages: list[str]  # the workflow's timing stages (casola.flow.engine.stage_names)
    stats: TurnStats

    @property
    def realtime(self) -> RealtimeConfig:
        return self.config.realtime

    @property
    def first_step(self) -> int:
        return turn_start(self.config)

    @property
    def asr_model(self) -> str:
        """The model that transcribes a committed buffer (server VAD off)."""
        if self.realtime.asr:
            return self.realtime.asr
        before = self.config.steps[: max(self.first_step, 0)]
        return next((s.model for s in reversed(before) if s.kind == "model"), "")

    @property
    def speak_step(self) -> str:
        """The step that speaks (the one after `sentences`), or "" when the workflow ends in text."""
        steps = self.config.steps
        last = steps[-1]
        return last.name if last.kind == "model" and len(steps) > 1 and steps[-2].kind == "sentences" else ""
