"""Where a voice turn's time goes: end of user speech -> the agent's first audio byte (DESIGN
"Timing users can see", for a conversation).

The parts follow the turn's critical path, on this process's clock (perf_counter, seconds):

    speech ends ... vad_tail ... speech_stopped -- listen -- transcript -- (turn starts) --
        llm_first_sentence -- first sentence -- tts_first_audio -- first audio written

- `vad_tail_ms`: the silence the VAD waited for before deciding the user had stopped (its
  `silence_ms`, on the audio's own clock; at real-time pace, wall time). The end of speech is taken
  as `speech_stopped`'s arrival less this.
- `listen_ms`: speech_stopped -> its transcript arrived; `asr_ms` of it is Whisper's own time.
- `llm_first_sentence_ms`: the turn's start -> the first whole sentence (LLM, tool calls, the
  sentence splitter); `tts_first_audio_ms`: that sentence -> its first audio written to the client.
- `voice_to_voice_ms`: the sum, end of speech -> first audio byte written.
- `platform_ms`: the platform's own share of it: every instant on the path that no model was
  working for the turn. It is the listen stream's time beside Whisper's, the session's own time
  (transcript -> turn, first audio in -> out), the time no step request was in flight before the
  first audio (the run's `flow-overhead`), and each step request's hops: sent -> its first bytes
  back, less the worker's own time to them (its END timing's `first-byte`). Model time (the VAD's
  wait, Whisper, token generation, synthesis) is the rest.

`platform_parts_ms` says where the platform's share went: `listen`, `session`, `between_steps`, and
one entry per step (its requests' hops). A turn cut short (barge-in, a failure) before its first
audio has no voice_to_voice; one whose step requests did not all end has `platform_ms` from those
that did (`complete: false`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Final

from casola.opsmetrics import Exposition, labels
from casola.stats import FastHistogram

if TYPE_CHECKING:
    from casola.flow.run import Run

__all__ = ["PARTS", "TurnStats", "TurnTiming"]

PARTS: Final = ("voice_to_voice", "vad_tail", "listen", "asr", "llm_first_sentence", "tts_first_audio", "platform")


@dataclasses.dataclass(slots=True)
class TurnTiming:
    vad_tail_ms: float = 0.0
    asr_ms: float = 0.0
    t_stopped: float = 0.0  # speech_stopped arrived
    t_transcript: float = 0.0  # its transcript arrived
    t_start: float = 0.0  # the turn's run started
    t_sentence: float = 0.0  # the first sentence was complete
    t_audio_in: float = 0.0  # the first audio arrived from its step
    t_audio: float = 0.0  # the first audio was written to the client
    idle_ms: float = 0.0  # the run's flow-overhead up to the first audio

    def first_audio(self, run: Run, stage: str, now: float) -> None:
        """The first audio was written (`now`): it arrived with the first answer of `stage`'s requests."""
        self.t_audio = now
        self.t_audio_in = min((s.t_first for st, s, _ in run.sent if st == stage and s.t_first), default=now)
        self.idle_ms = run.clock.stages(now)["flow-overhead"]

    def report(self, run: Run | None) -> dict[str, Any]:
        """The turn's figures (milliseconds, 0.1 ms precision); those not reached are absent."""
        out: dict[str, Any] = {}
        if not self.t_audio:
            return out
        spoken = bool(self.t_stopped)  # a turn a text message started has no speech before it
        start = self.t_transcript if spoken else self.t_start
        total = (self.t_audio - start) * 1000
        own = (self.t_start - start + self.t_audio - self.t_audio_in) * 1000 + self.idle_ms
        if spoken:
            listen = (self.t_transcript - self.t_stopped) * 1000
            out |= {"vad_tail_ms": self.vad_tail_ms, "listen_ms": listen, "asr_ms": self.asr_ms}
            total += self.vad_tail_ms + listen
            own += max(listen - self.asr_ms, 0.0)
        out["llm_first_sentence_ms"] = (self.t_sentence - self.t_start) * 1000 if self.t_sentence else None
        out["tts_first_audio_ms"] = (self.t_audio - self.t_sentence) * 1000 if self.t_sentence else None
        hops, complete = _hops(run, self.t_audio_in) if run is not None else ({}, False)
        out["voice_to_voice_ms" if spoken else "text_to_voice_ms"] = total
        out["platform_ms"] = own + sum(hops.values())
        parts = {"listen": max(listen - self.asr_ms, 0.0)} if spoken else {}
        parts |= {"session": (self.t_start - start + self.t_audio - self.t_audio_in) * 1000,
                  "between_steps": self.idle_ms, **hops}  # fmt: skip
        out["platform_parts_ms"] = {k: round(v, 2) for k, v in parts.items()}
        out["complete"] = complete
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def _hops(run: Run, before: float) -> tuple[dict[str, float], bool]:
    """Σ (sent -> first bytes back - the worker's first-byte) over the step requests whose first
    bytes came back by `before`; False when one of them has not reported its worker time (it was
    cancelled, or has not ended yet)."""
    total: dict[str, float] = {}
    complete = True
    for stage, stream, sent in run.sent:
        if not stream.t_first or stream.t_first > before:
            continue
        # A streamed answer's END has the worker's `first-byte`; an answer in one frame, its `work`.
        worker = stream.timing.get("first-byte", stream.timing.get("work"))
        if worker is None or not stream.done:
            complete = False
            continue
        total[stage] = total.get(stage, 0.0) + max((stream.t_first - sent) * 1000 - worker, 0.0)
    return total, complete


class TurnStats:
    """Every turn's figures as histograms, for `/metrics` (`casola_realtime_turn_seconds{part}`)."""

    def __init__(self) -> None:
        self.parts = {p: FastHistogram() for p in PARTS}
        self.turns: dict[str, int] = {"completed": 0, "cancelled": 0, "failed": 0}

    def observe(self, status: str, report: dict[str, Any]) -> None:
        if status in self.turns:  # a fixed set of labels
            self.turns[status] += 1
        for part, hist in self.parts.items():
            v = report.get(f"{part}_ms")
            if isinstance(v, int | float) and not isinstance(v, bool):
                hist.observe(v / 1000)

    def write(self, out: Exposition) -> None:
        """The families of `/metrics` (casola.opsmetrics writes the text)."""
        out.histogram(
            "casola_realtime_turn_seconds",
            "Realtime voice turns: end of user speech to first agent audio (voice_to_voice) and its parts",
            ((labels(part=p), h.buckets(), h.sum) for p, h in self.parts.items()),
        )
        out.counter("casola_realtime_turns", "Realtime responses by how they ended",
                    ((labels(status=k), n) for k, n in self.turns.items()))  # fmt: skip
