"""The worker runtime every model handler runs in, and the built-in `echo` and `steps` models."""

from casola.worker.call import HandlerError, WorkCall
from casola.worker.echo import Echo
from casola.worker.model import BlockingModel, Model, Reply
from casola.worker.runtime import WorkerConfig, WorkerRuntime
from casola.worker.steps import Steps

__all__ = [
    "BlockingModel",
    "Echo",
    "HandlerError",
    "Model",
    "Reply",
    "Steps",
    "WorkCall",
    "WorkerConfig",
    "WorkerRuntime",
]
