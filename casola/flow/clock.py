"""Where a workflow's time goes: each step's share and the platform's own time between steps.

Steps stream into each other, so their requests overlap in time; the stages must not (DESIGN
"Timing users can see": they never overlap and nothing is hidden). Each instant of a run counts
for the first step, in pipeline order, that has a request in flight (the one holding the pipeline
back: while the LLM still generates, TTS of its first sentences runs in its shadow); an instant with
no step in flight is `flow-overhead`, the platform's own time between steps. So the `step.<name>`
stages and `flow-overhead` add up to the run's time exactly. No clock is read here: callers pass it.
"""

from __future__ import annotations

__all__ = ["StageClock"]


class StageClock:
    __slots__ = ("_active", "_spent", "_t", "first_byte", "idle", "names")

    def __init__(self, names: list[str], t0: float) -> None:
        """`names`: the stages in pipeline order (a step's tools right after it)."""
        self.names = names
        self._active = [0] * len(names)
        self._spent = [0.0] * len(names)
        self._t = t0
        self.idle = 0.0
        self.first_byte = 0.0  # seconds from t0 to the first output byte (0.0: none yet)

    def _advance(self, now: float) -> None:
        dt = now - self._t
        if dt <= 0.0:
            return
        self._t = now
        for i, n in enumerate(self._active):
            if n:
                self._spent[i] += dt
                return
        self.idle += dt

    def begin(self, stage: int, now: float) -> None:
        self._advance(now)
        self._active[stage] += 1

    def end(self, stage: int, now: float) -> None:
        self._advance(now)
        self._active[stage] -= 1

    def in_flight(self) -> list[str]:
        return [name for name, n in zip(self.names, self._active, strict=True) if n]

    def stages(self, now: float) -> dict[str, float]:
        """Milliseconds per stage so far: `step.<name>` for each, then `flow-overhead`."""
        self._advance(now)
        out = {f"step.{name}": s * 1000 for name, s in zip(self.names, self._spent, strict=True)}
        out["flow-overhead"] = self.idle * 1000
        return out
