"""The queue node: who may connect (`gate`), worker registry, admission (`admission`), dispatch,
forwarding, retries, cancellation and timing."""

from casola.queue.node import QueueConfig, QueueNode

__all__ = ["QueueConfig", "QueueNode"]
