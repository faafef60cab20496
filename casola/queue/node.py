"""The queue node: accepts ingresses and workers, dispatches each request to a worker with a free
slot, forwards both directions as the same payload buffers, retries once before the first response
frame, cancels, and times every stage (DESIGN "The path of one request", "Timing users can see").
This module is the links: handshakes (`gate` says who may connect), the frames of each ingress and
each worker, forwarding. A sync call's life from admission to its end is `dispatch`: sync requests
take their pool's capacity first and jump the async backlog (`scheduler`); one that cannot start
within its deadline is refused at once (`admission`); its input is classified in a race with the
worker (`filtering`); what the autoscaler needs is measured per (model, pool) (`signals`); async
jobs are `jobs` and `jobops`. Each of them is handed what it uses, never the node.

Everything runs in link callbacks: no task, no await per request. The node never touches payload
bytes; it re-labels frames with the other link's stream id and sends the same payload objects on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from time import perf_counter
from typing import Any

import msgspec

from casola.auth import Verifier
from casola.filter import Policy
from casola.net.handshake import MemoryDialer, accept_memory, serve_tcp
from casola.net.link import LinkBase
from casola.queue.config import QueueConfig
from casola.queue.dispatch import Dispatch
from casola.queue.filtering import Filtering, make_classifiers
from casola.queue.gate import Gate
from casola.queue.jobops import JobOp
from casola.queue.jobs import Jobs
from casola.queue.records import HOLD_MAX, RETAIN_MAX, Call, FilterCheck, WorkerEntry
from casola.queue.registry import Registry
from casola.store import AuditRecord
from casola.wire import (
    Buffer,
    ErrorCode,
    ErrorMeta,
    Event,
    Frame,
    FrameType,
    HeartbeatMeta,
    HelloAckMeta,
    HelloMeta,
    Limits,
    RequestMeta,
    StreamReset,
    error_info,
)

__all__ = ["QueueConfig", "QueueNode"]

log = logging.getLogger("casola.queue")

REQUEST, DATA, END, ERROR, CANCEL, RESPONSE = (
    FrameType.REQUEST,
    FrameType.DATA,
    FrameType.END,
    FrameType.ERROR,
    FrameType.CANCEL,
    FrameType.RESPONSE,
)
# An ingress link's stream window: every request of every client of that ingress is a stream on it,
# and the window must never be what refuses one (DESIGN "Auth and tenancy": no shared credit window
# is a global choke point). The ingress's own admission (max_inflight) stays far below it.
LINK_LIMITS = Limits(max_streams=65536)
# Worker errors the node may retry on another worker (before the first response frame only).
_NOT_RETRIED = frozenset({ErrorCode.OVERLOADED, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.CANCELLED})


class QueueNode:
    """One queue node. `start()` listens; `memory_dialer` lets an in-process ingress connect."""

    def __init__(self, config: QueueConfig, verifier: Verifier | None) -> None:
        self.config = config
        self.registry = Registry(config.models)
        self.stats = dict.fromkeys(("requests", "retries", "refused", "deadline_refused", "worker_failures"), 0)
        self.dispatch = Dispatch(config, self.registry.models, self.stats)  # a sync call's life
        self._server: asyncio.Server | None = None
        self._links: set[LinkBase] = set()
        self.memory_dialer: MemoryDialer = accept_memory(self.on_hello, limits=LINK_LIMITS)
        self.jobs: Jobs | None = None  # async jobs, when a store is configured
        # The content filter is off until start() (its classifiers may dial the node).
        self.filtering = Filtering(config.filter, [], None, self._spawn, self.dispatch, config.node_id)
        self._internal: set[LinkBase] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self.gate = Gate(verifier)  # who may connect, and the keys of those connected

    async def start(self) -> None:
        """Open the job store (if configured), then listen.

        Raises:
            StoreError: the job store cannot be opened.
            OSError: the address cannot be bound.
        """
        self.dispatch.loop = asyncio.get_running_loop()
        cfg, jc = self.config, self.config.jobs
        if jc.store:
            from casola.queue.webhooks import WebhookSigner
            from casola.store import open_store

            signer = WebhookSigner.load_or_create(Path(jc.webhook_key)) if jc.webhook_key else None
            self.jobs = Jobs(cfg, open_store(jc.store), signer, self.registry.models, self.dispatch.serve_pending)
            await self.jobs.start()
        fc = cfg.filter
        store = self.jobs.store if self.jobs is not None else None
        classifiers = make_classifiers(fc, self._connect_internal)
        self.filtering = Filtering(fc, classifiers, store, self._spawn, self.dispatch, cfg.node_id)
        await self.filtering.start()
        host, _, port = cfg.listen.rpartition(":")
        self._server = await serve_tcp(host, int(port), self.on_hello, limits=LINK_LIMITS)
        self.gate.start()

    async def connect_member(self, hello: HelloMeta, on_events: Any, on_lost: Any, **kw: Any) -> LinkBase:
        """The front door for a member of this process (the workflow engine): a link like any
        worker's or ingress's (`hello.role`), admitted without a key, its requests filtered,
        scheduled and refused like an ingress's. The node knows nothing more about workflows."""
        hello = msgspec.structs.replace(hello, credential=self.gate.member_secret)
        return await self.memory_dialer(hello, on_events, on_lost, **kw)

    async def _connect_internal(self, on_events: Any, on_lost: Any) -> LinkBase:
        """An in-process ingress link of the node's own (the model classifier's requests travel on it)."""
        hello = HelloMeta("ingress", credential=self.gate.internal_secret, node_id=f"{self.config.node_id}/internal")
        return await self.memory_dialer(hello, on_events, on_lost)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("queue node task failed: %r", exc, exc_info=exc)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.shut_down("the queue node is stopping")
        if self._server is not None:
            await self._server.wait_closed()
        await self.gate.stop()
        await self.filtering.stop()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.jobs is not None:
            await self.jobs.stop()

    # -- handshake ---------------------------------------------------------------------------------

    def on_hello(self, link: LinkBase, frame: Frame) -> None:
        hello = frame.meta
        assert isinstance(hello, HelloMeta)
        if self.dispatch.loop is None:
            self.dispatch.loop = asyncio.get_running_loop()
        kind = self.gate.admit(link, hello)  # raises Refused
        if kind == "worker":
            self._register_worker(link, hello)
        else:
            if kind == "internal":
                self._internal.add(link)
            link.tag = {}  # ingress-side stream id -> Call
            link.on_events, link.on_lost = self._ingress_events, self._ingress_lost
            self._ack(link, credit=link.conn.limits.max_streams)
        self._links.add(link)

    def _forget_link(self, link: LinkBase) -> None:
        self._links.discard(link)
        self.gate.forget(link)

    def _ack(self, link: LinkBase, credit: int) -> None:
        cfg = self.config
        link.send(Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(link.conn.version, cfg.node_id, cfg.region, credit)))

    def _register_worker(self, link: LinkBase, hello: HelloMeta) -> None:
        worker = WorkerEntry(link, hello.node_id, list(hello.models), hello.credit, hello.pool, hello.region)
        link.conn.set_ping_timeout(self.config.worker_ping_timeout)  # a hung worker is gone after this
        link.tag = worker
        link.on_events, link.on_lost = self._worker_events, self._worker_lost
        self._ack(link, credit=0)  # the queue node opens streams to the worker, never the reverse
        self.registry.add(worker)
        log.info("worker %s registered: models=%s capacity=%d", hello.node_id, hello.models, hello.credit)
        self.dispatch.serve_pending(worker)
        if self.jobs is not None:
            for m in worker.models:
                self.jobs.wake(m)

    # -- from ingresses ----------------------------------------------------------------------------

    def _ingress_events(self, link: LinkBase, events: list[Event]) -> None:
        now = perf_counter()
        calls: dict[int, Call] = link.tag
        for ev in events:
            try:
                if type(ev) is Frame:
                    t = ev.type
                    if t is REQUEST:
                        self._on_request(link, ev, now)
                    elif t is DATA or t is END:
                        call = calls.get(ev.stream_id)
                        if type(call) is Call:
                            self._on_request_data(call, ev)
                        elif call is not None:
                            call.feed(ev)  # type: ignore[attr-defined]  # a JobOp
                    elif t is CANCEL:
                        self._cancel(calls.pop(ev.stream_id, None), "cancelled by the client")
                elif type(ev) is StreamReset:
                    self._cancel(calls.pop(ev.stream_id, None), ev.message)
            except Exception as exc:  # one stream's failure is that stream's; the link serves on
                self._ingress_stream_failed(link, ev, exc)

    def _on_request(self, link: LinkBase, frame: Frame, now: float) -> None:
        meta = frame.meta
        assert isinstance(meta, RequestMeta)
        self.stats["requests"] += 1
        sid = frame.stream_id
        if meta.op:
            if self.jobs is None:
                msg = "async jobs are off: this queue node has no job store"
                return self._refuse(link, sid, ErrorCode.BAD_REQUEST, msg)
            op = link.tag[sid] = JobOp(self.jobs, self._screen_job, link, frame)
            op.feed(frame)
            return
        model = self.registry.models.get(meta.model)
        if model is None:
            return self._refuse(link, sid, ErrorCode.UNKNOWN_MODEL, f"model {meta.model!r} is not served here")
        if not model.workers:
            msg = f"no worker for model {meta.model!r} is connected"
            return self._refuse(link, sid, ErrorCode.NO_CAPACITY, msg, self.config.retry_after_ms)
        cfg = self.config
        call = Call(link, sid, meta, model, now, cfg.deadlines.get(meta.model, 0), cfg.sync_wait_ms)
        call.keep(frame)
        call.req_done = frame.end
        link.tag[sid] = call
        model.signals.arrival("sync", now)
        check = self.filtering.begin(call) if self.filtering.enabled and link not in self._internal else None
        if check is None:
            return self.dispatch.schedule(call, now)
        call.filter = check
        if check.policy is Policy.BLOCK:
            call.held = True  # dispatched by Dispatch.release_held() once the verdict is clean
        else:
            self.dispatch.schedule(call, now)
        self.filtering.feed(check, frame.payload, frame.end)

    def _on_request_data(self, call: Call, frame: Frame) -> None:
        call.req_done = frame.end
        if frame.end:
            call.t_req_end = perf_counter()  # the stages count from here (Call.timing)
        kept = call.keep(frame) if not call.head_seen else True
        if call.worker is not None:
            w = call.worker
            w.link.send_if_open(Frame(frame.type, call.w_sid, frame.meta, frame.payload, frame.flags))
        elif not kept:
            self.dispatch.fail(
                call, ErrorCode.PAYLOAD_TOO_LARGE, f"request bodies waiting for a slot are capped at {RETAIN_MAX} bytes"
            )
            return
        if call.filter is not None and not call.filter.started:
            self.filtering.feed(call.filter, frame.payload, frame.end)

    def _screen_job(self, meta: RequestMeta, data: Buffer) -> Awaitable[AuditRecord | None]:
        """A job submit's input through the content filter in place when the submit runs."""
        return self.filtering.check_job(meta, data)

    def _ingress_stream_failed(self, link: LinkBase, ev: Event, exc: Exception) -> None:
        sid = getattr(ev, "stream_id", 0)
        item = link.tag.pop(sid, None)
        rid = item.meta.request_id if type(item) is Call else ""
        log.error(
            "ingress stream %d failed in the queue node; ending that stream only",
            sid,
            exc_info=exc,
            extra={"request_id": rid},
        )
        try:
            if type(item) is Call:
                self.dispatch.abort_call(item, ErrorCode.INTERNAL, "internal error in the queue node")
            elif item is not None:
                item.cancel()
        finally:
            link.reset_if_open(sid, ErrorCode.INTERNAL, "internal error in the queue node")

    def _ingress_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        self._forget_link(link)
        self._internal.discard(link)
        calls: dict[int, Call | JobOp] = link.tag
        for call in list(calls.values()):
            self._cancel(call, "the ingress went away")
        calls.clear()

    # -- from workers ------------------------------------------------------------------------------

    def _worker_events(self, link: LinkBase, events: list[Event]) -> None:
        worker: WorkerEntry = link.tag
        t_answer = perf_counter()
        credit = False
        for ev in events:
            try:
                if type(ev) is Frame:
                    t = ev.type
                    call = worker.calls.get(ev.stream_id)
                    if call is not None and (t is RESPONSE or t is DATA or t is END or t is ERROR):
                        self._from_worker(call, ev, t_answer)
                    elif t is FrameType.CREDIT:
                        credit = True
                    elif t is FrameType.HEARTBEAT:
                        credit = self._on_heartbeat(worker, ev) or credit
                    elif t is FrameType.GOAWAY:
                        self._worker_unavailable(worker, "is draining")
                    elif call is None and (job := worker.jobs.get(ev.stream_id)) is not None:
                        self.jobs.on_worker_frame(worker, job, ev)  # type: ignore[union-attr]
                elif type(ev) is StreamReset:
                    call = worker.calls.pop(ev.stream_id, None)
                    if call is not None:
                        self.dispatch.worker_failed(call, worker, ev.code, ev.message)
                    elif (job := worker.jobs.get(ev.stream_id)) is not None:
                        self.jobs.on_worker_reset(job, ev.message)  # type: ignore[union-attr]
            except Exception as exc:  # one stream's failure is that stream's; the worker serves on
                self._worker_event_failed(worker, ev, exc)
        if credit:
            self.dispatch.serve_pending(worker)
            if self.jobs is not None and worker.free > 0:
                for m in worker.models:
                    if m in self.jobs.maybe_queued:
                        self.jobs.wake()
                        break

    def _on_heartbeat(self, worker: WorkerEntry, frame: Frame) -> bool:
        """A worker's health and load; True when it says it can serve (its slots may be used)."""
        hb = frame.meta
        assert isinstance(hb, HeartbeatMeta)
        was_healthy = worker.healthy
        worker.healthy, worker.load = hb.healthy, hb.load
        if self.jobs is not None and worker.jobs:
            self.jobs.on_heartbeat(worker)
        if was_healthy and not hb.healthy:
            self._worker_unavailable(worker, "reports itself unhealthy")
        return hb.healthy

    def _worker_unavailable(self, worker: WorkerEntry, why: str) -> None:
        """A worker takes no new work (draining, unhealthy): the requests waiting for a model that
        has no other worker now get NO_CAPACITY at once instead of waiting for nothing."""
        log.info("worker %s %s: no new work for it", worker.node_id, why)
        for name in worker.models:
            model = self.registry.models[name]
            if not model.live_workers:
                self.dispatch.fail_pending(
                    model, ErrorCode.NO_CAPACITY, f"no worker for model {name!r} can serve: the last {why}"
                )

    def _worker_event_failed(self, worker: WorkerEntry, ev: Event, exc: Exception) -> None:
        sid = getattr(ev, "stream_id", 0)
        call = worker.calls.pop(sid, None)
        rid = call.meta.request_id if call is not None else ""
        what = f"worker {worker.node_id} stream {sid} failed in the queue node; ending it only"
        log.error(what, exc_info=exc, extra={"request_id": rid})
        job = worker.jobs.get(sid)
        try:
            if call is not None:
                self.dispatch.fail(call, ErrorCode.INTERNAL, "internal error in the queue node")
            elif job is not None and self.jobs is not None:
                self.jobs.on_worker_reset(job, "internal error in the queue node")
        finally:
            worker.link.reset_if_open(sid, ErrorCode.INTERNAL, "internal error in the queue node")

    def _from_worker(self, call: Call, frame: Frame, t_answer: float) -> None:
        """A RESPONSE, DATA, END or ERROR of the worker running `call`: on to the ingress (an ERROR
        before the answer's head is retried once on another worker when it says it may be)."""
        t = frame.type
        if t is RESPONSE:
            call.head_seen = True
            call.frames = []  # no retry from here on: let the request buffers go
        elif t is ERROR:
            worker = call.worker
            assert worker is not None and isinstance(frame.meta, ErrorMeta)
            worker.calls.pop(call.w_sid, None)
            code = frame.meta.code
            retryable = call.retryable and error_info(code).retryable and code not in _NOT_RETRIED
            if retryable and self.dispatch.may_retry(call, worker):
                return self.dispatch.retry(call, worker, f"worker {worker.node_id} failed: {frame.meta.message}", code)
        check = call.filter
        if check is not None and check.policy is Policy.HOLD and not check.decided:
            return self._hold(call, check, frame, t_answer)  # released (or dropped) by the verdict
        call.ing.send_if_open(call.answer(frame, t_answer, perf_counter()))
        if frame.end or t is ERROR:
            self.dispatch.done(call)

    def _hold(self, call: Call, check: FilterCheck, frame: Frame, t_answer: float) -> None:
        """Policy `hold`: the answer waits here for a clean verdict (Dispatch.release_answer)."""
        check.held.append((frame, t_answer))
        check.held_bytes += len(frame.payload)
        if check.held_bytes > HOLD_MAX:
            msg = f"the answer grew past {HOLD_MAX} bytes before its input was classified"
            self.dispatch.abort_call(call, ErrorCode.OVERLOADED, msg)

    def _worker_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        self._forget_link(link)
        worker: WorkerEntry = link.tag
        self.registry.remove(worker)
        log.warning("worker %s lost (%s); %d requests in flight", worker.node_id, exc or "closed", len(worker.calls))
        if self.jobs is not None:
            self.jobs.on_worker_lost(worker)
        calls, worker.calls = list(worker.calls.values()), {}
        for call in calls:
            self.dispatch.worker_failed(call, worker, ErrorCode.WORKER_FAILED, "the worker disconnected")
        for name in worker.models:
            model = self.registry.models[name]
            if not model.live_workers:
                self.dispatch.fail_pending(model, ErrorCode.NO_CAPACITY, f"no worker for model {name!r} can serve")

    # -- endings -----------------------------------------------------------------------------------

    def _cancel(self, item: Call | JobOp | None, message: str) -> None:
        """The client no longer wants the answer: a call's slot or place in line is freed, a job
        operation dropped."""
        if item is None:
            return
        if type(item) is JobOp:
            item.cancel()
            return
        assert isinstance(item, Call)
        self.dispatch.cancel(item, message)

    def _refuse(self, link: LinkBase, sid: int, code: int, message: str, retry_after_ms: int = 0) -> None:
        self.stats["refused"] += 1
        link.send_if_open(Frame(ERROR, sid, ErrorMeta(code, message, retry_after_ms)))

    # -- what operators and the ingress read ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "node_id": self.config.node_id,
            "region": self.config.region,
            "workers": len(self.registry.workers),
            "models": self.registry.snapshot(),
            "stats": dict(self.stats),
            "jobs": dict(self.jobs.stats) if self.jobs is not None else None,
            "filter": self.filtering.snapshot(),
        }

    def signals(self) -> dict[str, Any]:
        """What the autoscaler reads: per (model, pool) arrivals, queue depth, wait, service, busy."""
        return {
            "node_id": self.config.node_id,
            "region": self.config.region,
            "pools": self.registry.signals(perf_counter()),
            "filter": self.filtering.snapshot(),
        }
