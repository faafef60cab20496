"""Content filtering as a race with dispatch (DESIGN "Content filtering off the critical path").

When a sync request's input is complete, its classification starts: right after the node has
handed the request to a worker (race) or, for models that require it, before (block). The verdict
decides:

- a violation while the request is still in the node (queued, running, streaming): the worker's
  stream is cancelled and the client gets `content_policy_violation` (a stream ends with it and no
  further byte is sent). With `block`, the request never reaches a worker;
- a violation after the response finished: delivered untouched; the verdict is recorded (log,
  metric, audit record);
- clean: nothing happens (block: the request is dispatched now).

A classifier answers at once (a small input through the rules) or later (an awaitable); nothing on
the request's path awaits it. `Server-Timing` gets `filter;dur=...` when the verdict came before the
response, and `filter;desc="pending"` (`casola.queue.records.PENDING`) when it had not.

Of the node it is given what a verdict acts on: `Enforce`, the two things a verdict may do to a
request still in the node (abort it; dispatch a held one), and the node's id for audit record ids.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter, time
from typing import Any, Final, Protocol

import msgspec

from casola.filter.base import Classifier, FilterConfig, Policy, Verdict
from casola.filter.remote import Connect, ModelClassifier
from casola.filter.rules import RuleClassifier
from casola.queue.records import Call, FilterCheck
from casola.stats import FastHistogram
from casola.store import AuditRecord, JobStore
from casola.wire import Buffer, ErrorCode, RequestMeta

__all__ = ["Enforce", "Filtering", "make_classifiers"]

log = logging.getLogger("casola.filter")
audit_log = logging.getLogger("casola.audit")

_FLUSH_S: Final = 0.05  # audit records are written in batches at most this old
_VERDICT_FIRST: Final = frozenset({Policy.BLOCK, Policy.HOLD})  # no byte of the answer before a clean verdict
_POLICIES: Final = {p.value: p for p in Policy}
_LIMIT: Final = "limit"  # the classifier named in the verdict on an input too large to classify


def make_classifiers(config: FilterConfig, connect: Connect) -> list[Classifier]:
    """The classifiers `config` names (`connect` dials the node for the model classifier).

    Raises:
        ValueError: an unknown classifier, or an invalid rule pattern.
    """
    out: list[Classifier] = []
    for name in config.classifiers:
        if name == "rules":
            rules = RuleClassifier(config.terms, config.patterns)
            if not rules.empty:  # nothing configured: nothing to race
                out.append(rules)
        elif name == "model":
            out.append(ModelClassifier(connect, config.classify_model, config.timeout_ms))
        else:
            raise ValueError(f"[queue.filter] classifiers: unknown classifier {name!r} (rules, model)")
    return out


class Enforce(Protocol):
    """What a verdict may do to a request still in the node (the node's dispatch does it)."""

    def abort_call(self, call: Call, code: int, message: str) -> None:
        """Stop it (out of its line, or CANCEL to its worker); the client gets the error."""

    def release_held(self, call: Call) -> None:
        """A held (block) request's verdict is clean: dispatch it now."""

    def release_answer(self, call: Call) -> None:
        """A `hold` request's verdict is clean: what its worker answered so far goes on now."""


class Filtering:
    def __init__(
        self,
        config: FilterConfig,
        classifiers: list[Classifier],
        store: JobStore | None,
        spawn: Callable[[Awaitable[object]], None],
        enforce: Enforce,
        node_id: str,
    ) -> None:
        """`store`: where audit records go (else the log only); `spawn`: runs a task the node owns."""
        self.config, self.classifiers = config, classifiers
        self._store, self._spawn = store, spawn
        self._enforce, self._node_id = enforce, node_id
        self.enabled = bool(classifiers)
        self._default = Policy(config.policy)  # as Policy members, also when built in Python with strs
        self._models = {m: Policy(p) for m, p in config.models.items()}
        self.stats = {"classified": 0, "flagged": 0, "aborted": 0, "blocked": 0, "late": 0, "errors": 0}
        self.duration = FastHistogram()
        self._audit: list[AuditRecord] = []
        self._flush: asyncio.TimerHandle | None = None
        self._seq = 0

    async def start(self) -> None:
        for c in self.classifiers:
            await c.start()

    async def stop(self) -> None:
        for c in self.classifiers:
            await c.stop()
        if self._flush is not None:
            self._flush.cancel()
        await self._write_audit()

    # -- policy --------------------------------------------------------------------------------------

    def policy(self, model: str, key_policy: str) -> Policy:
        """A model configured `block` always blocks; otherwise the key's policy, else the model's."""
        model_policy = self._models.get(model, self._default)
        if model_policy is Policy.BLOCK:
            return Policy.BLOCK
        return _POLICIES.get(key_policy, model_policy)

    def begin(self, call: Call) -> FilterCheck | None:
        """The request's check, or None when it is not classified."""
        if not self.enabled:
            return None
        policy = self.policy(call.meta.model, call.meta.filter)
        return FilterCheck(call, policy) if policy is not Policy.OFF else None

    def feed(self, check: FilterCheck, payload: Buffer, end: bool) -> None:
        """More of the request's input; at its end, the classification starts."""
        if check.started:
            return
        if len(payload):
            check.size += len(payload)
            if check.size <= self.config.max_input:
                check.parts.append(payload)
        if end:
            self.run(check)

    # -- classification ------------------------------------------------------------------------------

    def run(self, check: FilterCheck) -> None:
        check.started = True
        check.t0 = perf_counter()
        self.stats["classified"] += 1
        if check.size > self.config.max_input:
            check.parts = []
            check.waiting = 1
            return self._verdict(check, self._too_large(check.size))
        parts, check.parts = check.parts, []
        data: Buffer = parts[0] if len(parts) == 1 else b"".join(parts) if parts else b""
        meta = check.call.meta
        check.waiting = len(self.classifiers)
        for c in self.classifiers:
            try:
                out = c.classify(data, meta.content_type, meta.model)
            except Exception as exc:  # a classifier bug must not take the request down
                out = Verdict(error=f"{c.name}: {exc}", classifier=c.name)
            if isinstance(out, Verdict):
                self._verdict(check, out)
            else:
                self._await(check, c.name, out)

    def _await(self, check: FilterCheck, name: str, out: Awaitable[Verdict]) -> None:
        fut = asyncio.ensure_future(out)
        timer = asyncio.get_running_loop().call_later(self.config.timeout_ms / 1000, fut.cancel)

        def done(f: asyncio.Future[Verdict]) -> None:
            timer.cancel()
            if f.cancelled():
                v = Verdict(error=f"{name}: no verdict within {self.config.timeout_ms} ms", classifier=name)
            elif (exc := f.exception()) is not None:
                v = Verdict(error=f"{name}: {exc}", classifier=name)
            else:
                v = f.result()
            self._verdict(check, v)

        fut.add_done_callback(done)

    def _too_large(self, size: int) -> Verdict:
        return Verdict(error=f"input of {size} bytes is over the filter's max_input", classifier=_LIMIT)

    def _violates(self, v: Verdict, policy: Policy) -> bool:
        """A violation, or a failure that counts as one: with `on_error = "block"`, or an input too
        large to classify sent to a model that requires a verdict first."""
        if v.flagged:
            return True
        if not v.error:
            return False
        return self.config.on_error == "block" or (v.classifier == _LIMIT and policy in _VERDICT_FIRST)

    def _failed(self, model: str, v: Verdict) -> None:
        if v.error:
            self.stats["errors"] += 1
            log.warning("%s: classification failed: %s", model, v.error)

    def _verdict(self, check: FilterCheck, v: Verdict) -> None:
        if check.decided:
            return
        check.waiting -= 1
        self._failed(check.call.meta.model, v)
        violation = self._violates(v, check.policy)
        if not violation and check.waiting > 0:
            return
        check.decided = True
        check.dur_ms = (perf_counter() - check.t0) * 1000
        self.duration.observe(check.dur_ms / 1000)
        self._decide(check, v, violation)

    def _decide(self, check: FilterCheck, v: Verdict, violation: bool) -> None:
        call = check.call
        live = not call.finished
        if violation:
            self.stats["flagged"] += 1
            outcome = "late"
            if live:
                unsent = call.worker is None or check.policy is Policy.HOLD  # nothing of the answer left
                outcome = "blocked" if check.policy in _VERDICT_FIRST and unsent else "aborted"
            self.stats[outcome] += 1
            rec = self._record(check.call.meta, check.policy, check.dur_ms, v, outcome, before=live)
            if live:
                code = ErrorCode.PAYLOAD_TOO_LARGE if v.classifier == _LIMIT else ErrorCode.CONTENT_POLICY_VIOLATION
                msg = "the input was classified as violating the content policy"
                if code == ErrorCode.PAYLOAD_TOO_LARGE:
                    msg = f"the input is too large to classify ({check.size} bytes; max {self.config.max_input})"
                self._enforce.abort_call(call, code, f"{msg} (audit id {rec.id})")
            return
        if v.error or self.config.audit_clean:
            self._record(check.call.meta, check.policy, check.dur_ms, v, "error" if v.error else "clean", before=live)
        if live and check.policy is Policy.BLOCK and call.held:
            self._enforce.release_held(call)
        elif live and check.policy is Policy.HOLD:
            self._enforce.release_answer(call)

    # -- async jobs ----------------------------------------------------------------------------------

    async def check_job(self, meta: RequestMeta, data: Buffer) -> AuditRecord | None:
        """Classify an async job's input before it is persisted, whatever the policy but `off`: no
        one waits on its first byte, and a stored job must never run on a violating input. Returns
        the audit record of a violation (the submit is then refused), else None."""
        if not self.enabled:
            return None
        policy = self.policy(meta.model, meta.filter)
        if policy is Policy.OFF:
            return None
        self.stats["classified"] += 1
        t0 = perf_counter()
        too_large = len(data) > self.config.max_input
        verdicts = [self._too_large(len(data))] if too_large else []
        for c in () if too_large else self.classifiers:
            try:
                out = c.classify(data, meta.content_type, meta.model)
                v = out if isinstance(out, Verdict) else await asyncio.wait_for(out, self.config.timeout_ms / 1000)
            except Exception as exc:
                v = Verdict(error=f"{c.name}: {exc or type(exc).__name__}", classifier=c.name)
            verdicts.append(v)
            if self._violates(v, policy):
                break
        dur_ms = (perf_counter() - t0) * 1000
        self.duration.observe(dur_ms / 1000)
        for v in verdicts:
            self._failed(meta.model, v)
        verdict = verdicts[-1] if verdicts else Verdict()
        if self._violates(verdict, policy):
            self.stats["flagged"] += 1
            self.stats["blocked"] += 1
            return self._record(meta, policy, dur_ms, verdict, "blocked", before=True)
        if verdict.error or self.config.audit_clean:
            self._record(meta, policy, dur_ms, verdict, "error" if verdict.error else "clean", before=True)
        return None

    # -- audit ---------------------------------------------------------------------------------------

    def _record(
        self, meta: RequestMeta, policy: Policy, dur_ms: float, v: Verdict, outcome: str, before: bool
    ) -> AuditRecord:
        self._seq += 1
        rec = AuditRecord(
            id=f"{self._node_id}-{int(time() * 1000):x}-{self._seq}",
            at=time(),
            tenant=meta.tenant,
            model=meta.model,
            request_id=meta.job_id,
            policy=policy.value,
            outcome=outcome,
            flagged=v.flagged,
            label=v.label,
            score=v.score,
            classifier=v.classifier,
            filter_ms=round(dur_ms, 3),
            before_response=before,
            detail=v.error,
        )
        log_fn = audit_log.warning if v.flagged else audit_log.info
        log_fn("%s", msgspec.json.encode(rec).decode())
        if self._store is not None:
            self._audit.append(rec)
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(_FLUSH_S, self._flush_now)
        return rec

    def _flush_now(self) -> None:
        self._flush = None
        self._spawn(self._write_audit())

    async def _write_audit(self) -> None:
        batch, self._audit = self._audit, []
        if batch and self._store is not None:
            await self._store.record_audit(batch)

    def snapshot(self) -> dict[str, Any]:
        return {
            "classifiers": [c.name for c in self.classifiers],
            "stats": dict(self.stats),
            "duration": {"count": self.duration.count, "sum_s": round(self.duration.sum, 6)},
        }
