"""Errors outside the protocol (STYLE §5): the transport went away; and a log for them that a flood of
bad connections cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import time

from casola.wire.errors import CasolaError

__all__ = ["ConnectionLost", "RateLimitedLog"]


class ConnectionLost(CasolaError):
    """The connection closed (peer EOF, reset, or a protocol error) while it was in use; retryable."""


class RateLimitedLog:
    """One line per event, at most `per_second` a second (a burst of as many): beyond, lines are
    counted and the next one that gets through says how many were left out. One per listener:
    each refused or broken connection is worth a line, never a traceback, and 10,000 of them a
    second are not worth 10,000 lines."""

    __slots__ = ("_logger", "_per_second", "_suppressed", "_tokens", "_updated")

    def __init__(self, logger: logging.Logger, per_second: float = 5.0) -> None:
        self._logger, self._per_second = logger, per_second
        self._tokens, self._updated, self._suppressed = per_second, time.monotonic(), 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        self._tokens = min(self._per_second, self._tokens + (now - self._updated) * self._per_second)
        self._updated = now
        if self._tokens < 1:
            self._suppressed += 1
            return
        self._tokens -= 1
        if self._suppressed:
            msg, args = msg + " (and %d more like it not logged)", (*args, self._suppressed)
            self._suppressed = 0
        self._logger.warning(msg, *args)
