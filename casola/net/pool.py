"""Persistent links: keep one link to an address up, redialling with backoff and jitter.

Ingresses keep links to their queue nodes and workers keep links to theirs; neither may give up
when a peer restarts. `Redialer` dials, waits for the link to end, and dials again, sleeping between
failures with exponential backoff and full jitter (so a restarted queue node is not hit by every
worker at the same instant). A refusal (bad credential) backs off to the cap: retrying fast cannot
fix it. RTT and liveness come from the core's PING (SPEC §6.4): a link that misses its PONG ends,
and is redialled like any other loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from casola.net.errors import ConnectionLost
from casola.net.handshake import Refused
from casola.net.link import LinkBase

__all__ = ["Backoff", "Redialer"]

log = logging.getLogger("casola.net")


class Backoff:
    """Exponential backoff with full jitter: the n-th delay is uniform in [0, min(cap, base * 2^n))."""

    def __init__(self, base: float = 0.05, cap: float = 5.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Redialer:
    """Keeps one link to a peer up. `link` is the live link or None; `up` is set while one is.

    Args:
        connect: a coroutine function returning a handshaken link (e.g. `dial_tcp` bound to an address).
        name: for logs.
        on_up, on_down: called with the link when it comes up / after it ended.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[LinkBase]],
        *,
        name: str = "",
        backoff: Backoff | None = None,
        on_up: Callable[[LinkBase], None] | None = None,
        on_down: Callable[[LinkBase], None] | None = None,
    ) -> None:
        self.name = name
        self.link: LinkBase | None = None
        self.up = asyncio.Event()
        self.last_error: BaseException | None = None
        self.dials = 0
        self._connect = connect
        self._backoff = backoff or Backoff()
        self._on_up, self._on_down = on_up, on_down
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()  # wakes a backoff pause at once on stop()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"redial {self.name}")

    async def stop(self) -> None:
        """Stop redialling and end the current link (GOAWAY, SHUTTING_DOWN on its open streams)."""
        self._stopping = True
        self._stopped.set()
        if self.link is not None:
            self.link.shut_down()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while not self._stopping:
            self.dials += 1
            try:
                link = await self._connect()
            except (TimeoutError, OSError, ConnectionLost) as exc:
                self.last_error = exc
                delay = self._backoff.cap if isinstance(exc, Refused) else self._backoff.next()
                log.warning("%s: dial failed (%s); retrying in %.3f s", self.name, exc, delay)
                await self._pause(delay)
                continue
            if self._stopping:  # asyncio.wait_for (3.11) can swallow the cancel that stop() sent
                link.close()
                break
            self._backoff.reset()
            self.link = link
            self.up.set()
            if self._on_up is not None:
                self._on_up(link)
            await link.closed
            self.up.clear()
            self.link = None
            if self._on_down is not None:
                self._on_down(link)
            if not self._stopping:
                await self._pause(self._backoff.next())  # a flapping peer is not hammered

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), delay)
