"""Workflows: declared pipelines of steps run inside the queue node's process (DESIGN "Workflows")."""

from casola.flow.engine import Engine
from casola.flow.spec import StepConfig, ToolConfig, WorkflowConfig, WorkflowError, check_workflows, describe

__all__ = ["Engine", "StepConfig", "ToolConfig", "WorkflowConfig", "WorkflowError", "check_workflows", "describe"]
