"""Credentials held by open connections, re-checked several times a second (DESIGN "Auth and tenancy":
revocation and expiry apply to connections already open, within a second, not at their next connect).

A connection authenticates once, in HELLO. Each role registers the claims it accepted with the
`CredentialWatch` of its process and gets told, through the callback it gave, when they stop being
good: the key was revoked (`casola keys revoke` rewrote the revocation list) or it expired. The role
then ends the connection (GOAWAY `UNAUTHENTICATED`). A sweep is one stat() of the revocation list and
a float compare and a set lookup per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

from casola.auth.tokens import AuthError, Claims, Verifier

__all__ = ["SWEEP_INTERVAL_S", "CredentialWatch"]

log = logging.getLogger("casola.auth")

# Revocation reaches an open connection within this plus the time to act on it: well inside the
# one second the design promises, for one stat() a sweep.
SWEEP_INTERVAL_S: Final = 0.25

OnInvalid = Callable[[AuthError], None]


class CredentialWatch:
    """The claims of open connections, and what to do when one stops being valid."""

    __slots__ = ("_entries", "_interval", "_next", "_task", "_verifier")

    def __init__(self, verifier: Verifier, interval: float = SWEEP_INTERVAL_S) -> None:
        self._verifier = verifier
        self._interval = interval
        self._entries: dict[int, tuple[Claims, OnInvalid]] = {}
        self._next = 0
        self._task: asyncio.Task[None] | None = None

    def add(self, claims: Claims, on_invalid: OnInvalid) -> int:
        """Watch `claims`; `on_invalid(error)` is called once, from the event loop, when they are
        revoked or expire. Returns a handle for `remove`."""
        self._next += 1
        self._entries[self._next] = (claims, on_invalid)
        return self._next

    def remove(self, handle: int) -> None:
        """Stop watching (the connection closed). Unknown handles are ignored."""
        self._entries.pop(handle, None)

    def __len__(self) -> int:
        return len(self._entries)

    def sweep(self, now: float) -> int:
        """Check every watched credential at `now` (unix seconds); returns how many failed. Raises
        nothing: a failing callback is logged and the others still run."""
        self._verifier.refresh()
        failed: list[tuple[int, OnInvalid, AuthError]] = []
        for handle, (claims, on_invalid) in self._entries.items():
            try:
                self._verifier.check(claims, now)
            except AuthError as exc:  # a fresh copy: the raised one's traceback would hold this frame
                failed.append((handle, on_invalid, AuthError(exc.status, exc.code, exc.message)))
        for handle, on_invalid, err in failed:
            del self._entries[handle]
            try:
                on_invalid(err)
            except Exception:
                log.exception("ending a connection whose key is no longer valid failed (%s)", err.message)
        return len(failed)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="credential watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._entries:
                self.sweep(time.time())  # expiry is wall-clock, as in the tokens
