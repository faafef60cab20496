"""casola: a low-latency inference router and agent-workflow orchestrator."""

__all__ = ["__version__"]
__version__ = "0.1.0"
