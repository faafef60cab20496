"""A write gate many coroutines can wait on (STYLE §6 layer 1).

`pause_writing`/`resume_writing` from the transport drive it. Unlike dask's single `_drain_waiter`
slot, every writer that waits while the transport is paused is woken on resume, or failed on loss.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["WriteGate"]


class WriteGate:
    __slots__ = ("_exc", "_paused", "_waiters")

    def __init__(self) -> None:
        self._paused = False
        self._exc: BaseException | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def paused(self) -> bool:
        return self._paused

    async def wait(self) -> None:
        """Return when writing may go on.

        Raises:
            The exception given to `fail()` (the connection was lost).
        """
        if self._exc is not None:
            raise self._exc
        if self._paused:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake(lambda f: f.set_result(None))

    def fail(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake(lambda f: f.set_exception(exc))

    def _wake(self, how: Callable[[asyncio.Future[None]], None]) -> None:
        while self._waiters:
            if not (f := self._waiters.popleft()).done():
                how(f)
