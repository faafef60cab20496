"""The worker runtime every model handler runs in, and the built-in `echo` model."""

from casola.worker.call import HandlerError, WorkCall
from casola.worker.echo import Echo
from casola.worker.model import BlockingModel, Model
from casola.worker.runtime import WorkerConfig, WorkerRuntime

__all__ = ["BlockingModel", "Echo", "HandlerError", "Model", "WorkCall", "WorkerConfig", "WorkerRuntime"]
