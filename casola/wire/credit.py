"""Stream credits: how many more streams a peer may open (SPEC §7). Pure arithmetic.

A receiver grants credits (HELLO/HELLO_ACK `credit`, then CREDIT frames); each stream the peer opens
spends one. Credits are not returned when a stream closes: the receiver grants anew when it has
room. For a worker a credit is a free GPU slot, granted by its runtime when a slot frees. On an
ingress<->queue connection the window refills itself: like HTTP/2's WindowManager, freed credits are
re-advertised once at least half of the window is free, so a burst of short streams costs one CREDIT
frame per half window, not one per stream.
"""

from __future__ import annotations

from casola.wire.limits import MAX_CREDIT

__all__ = ["CreditWindow"]


class CreditWindow:
    """The receiving side's view: what it granted, what the peer spent, what to advertise next."""

    __slots__ = ("auto", "outstanding", "pending", "window")

    def __init__(self, window: int = 0, *, auto: bool = False) -> None:
        self.window = window  # the number of streams the receiver is willing to have open
        self.outstanding = 0  # granted and not yet spent
        self.pending = 0  # freed, not yet re-advertised (auto mode)
        self.auto = auto

    def granted(self, n: int) -> bool:
        """Record a grant of `n`; False if it would overflow the counter."""
        if n < 0 or self.outstanding + n > MAX_CREDIT:
            return False
        self.outstanding += n
        return True

    def spend(self) -> bool:
        """The peer opened a stream; False if it had no credit (CREDIT_VIOLATION)."""
        if self.outstanding <= 0:
            return False
        self.outstanding -= 1
        return True

    def released(self) -> int:
        """A stream the peer opened has closed. Returns the credit to advertise now (0: not yet)."""
        if not self.auto:
            return 0
        self.pending += 1
        if self.pending * 2 < max(self.window, 1):
            return 0
        grant, self.pending = self.pending, 0
        return grant
