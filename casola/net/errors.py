"""Errors outside the protocol (STYLE §5): the transport went away."""

from __future__ import annotations

from casola.wire.errors import CasolaError

__all__ = ["ConnectionLost"]


class ConnectionLost(CasolaError):
    """The connection closed (peer EOF, reset, or a protocol error) while it was in use; retryable."""
