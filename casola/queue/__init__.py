"""The queue node: worker registry, dispatch, forwarding, retries, cancellation and timing."""

from casola.queue.node import QueueConfig, QueueNode

__all__ = ["QueueConfig", "QueueNode"]
