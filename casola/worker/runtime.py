"""The worker runtime: dial the queue node(s), register, run handlers, stream answers, drain.

Each queue node gets one persistent link (redialled with backoff after a loss). HELLO carries the
worker credential, the models, the pool and the capacity as initial credit: the queue node may open
that many streams; one CREDIT goes back each time a slot frees (SPEC §7). A request runs as one task;
CANCEL (or the link's loss) cancels it. `drain()` (SIGTERM) sends GOAWAY so nothing new arrives,
lets running handlers finish, then closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import msgspec

from casola.logs import REQUEST_ID
from casola.net.handshake import dial_tcp
from casola.net.link import LinkBase
from casola.net.pool import Redialer
from casola.wire import (
    ErrorCode,
    Event,
    Frame,
    FrameType,
    HeartbeatMeta,
    HelloMeta,
    Limits,
    StreamReset,
)
from casola.worker.call import AnswerClosed, HandlerError, WorkCall
from casola.worker.model import BlockingModel, Model

__all__ = ["WorkerConfig", "WorkerRuntime"]

log = logging.getLogger("casola.worker")


class WorkerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    queue: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:7710"])  # queue nodes, host:port
    models: list[str] = msgspec.field(default_factory=lambda: ["echo"])
    capacity: int = 64  # requests run at once (the slots granted as credit)
    pool: str = "shared"  # sync | async | shared (shared: both classes, sync first)
    region: str = "local"
    node_id: str = ""
    threads: int = 4  # thread pool for blocking handlers
    heartbeat_interval: float = 1.0


# Dials one queue node in-process (QueueNode.connect_member) instead of over TCP.
Dial = Callable[..., Awaitable[LinkBase]]


class WorkerRuntime:
    def __init__(
        self,
        config: WorkerConfig,
        models: Sequence[Model],
        credential: str,
        limits: Limits | None = None,
        dial: Dial | None = None,
    ) -> None:
        """`limits`: this worker's receive limits (advertised in HELLO); the default pings every second.
        `dial`: the one queue node of this process to register with, in memory (`config.queue` unused)."""
        self.config = config
        self._dial_member = dial
        self.models: dict[str, Model] = {m.name: m for m in models}
        self.node_id = config.node_id or f"worker-{os.getpid()}"
        # A streaming handler holds one thread for its whole answer (casola.worker.model._Pieces), so
        # every slot may need one; threads start only when used.
        self.executor = ThreadPoolExecutor(max(config.threads, config.capacity), thread_name_prefix="casola-handler")
        for m in models:
            if isinstance(m, BlockingModel):
                m.executor = self.executor
        self._credential = credential
        self._tasks: dict[tuple[LinkBase, int], tuple[asyncio.Task[None], WorkCall]] = {}
        self.cancelled = 0  # calls the queue node cancelled (CANCEL or reset) while they ran or waited
        self._redialers: list[Redialer] = []
        self._draining = False
        self._healthy = True
        self._freed: dict[LinkBase, int] = {}  # slots freed this loop iteration, per link
        self._grant_scheduled = False
        self._heartbeat: asyncio.Task[None] | None = None
        self._limits = limits or Limits(ping_interval=1.0, ping_timeout=5.0)
        self._slots = asyncio.Semaphore(config.capacity)  # handlers running at once

    @property
    def active(self) -> int:
        return len(self._tasks)

    @property
    def healthy(self) -> bool:
        """Whether the worker says it can serve (its HEARTBEATs' `healthy`; draining says no)."""
        return self._healthy and not self._draining

    @healthy.setter
    def healthy(self, value: bool) -> None:
        """A model or the process noticed it cannot serve (a GPU fault, say), or can again: the
        queue nodes are told at once, and send no new work while it is False."""
        self._healthy = value
        self._send_heartbeats()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._dial_member is not None:  # the one queue node of the process hosting it
            self._redialers.append(Redialer(self._dial_memory, name=f"{self.node_id}->in-process"))
        else:
            loop.set_default_executor(self.executor)  # a worker process's own loop; not a host's
            for address in self.config.queue:
                host, _, port = address.rpartition(":")
                dial = functools.partial(self._dial_tcp, host, int(port))
                self._redialers.append(Redialer(dial, name=f"{self.node_id}->{address}"))
        for r in self._redialers:
            r.start()
        self._heartbeat = loop.create_task(self._beat())

    async def wait_registered(self, timeout: float = 10.0) -> None:
        """Until every queue node has accepted us (tests, `casola up` readiness)."""
        await asyncio.wait_for(asyncio.gather(*(r.up.wait() for r in self._redialers)), timeout)

    def _hello(self) -> HelloMeta:
        cfg = self.config
        return HelloMeta(
            "worker",
            credential=self._credential,
            node_id=self.node_id,
            region=cfg.region,
            credit=cfg.capacity,
            models=list(self.models),
            pool=cfg.pool,  # type: ignore[arg-type]
            max_meta=self._limits.max_meta,
            max_payload=self._limits.max_payload,
        )

    async def _dial_memory(self) -> LinkBase:
        assert self._dial_member is not None
        hello, limits = self._hello(), self._limits
        return await self._dial_member(
            hello, self._on_events, self._on_lost, dial_limits=limits, dial_auto_credit=False
        )

    async def _dial_tcp(self, host: str, port: int) -> LinkBase:
        hello, limits = self._hello(), self._limits
        link = await dial_tcp(host, port, hello, self._on_events, self._on_lost, limits=limits, auto_credit=False)
        log.info("%s registered with %s:%d (models %s)", self.node_id, host, port, list(self.models))
        return link

    # -- streams -----------------------------------------------------------------------------------

    def _on_events(self, link: LinkBase, events: list[Event]) -> None:
        tasks = self._tasks
        for ev in events:
            try:
                if type(ev) is Frame:
                    t = ev.type
                    if t is FrameType.REQUEST:
                        self._begin(link, ev)
                    elif t is FrameType.DATA or t is FrameType.END:
                        entry = tasks.get((link, ev.stream_id))
                        if entry is not None:
                            entry[1].feed(ev.payload, ev.end)
                    elif t is FrameType.CANCEL:
                        self._cancel(link, ev.stream_id)
                elif type(ev) is StreamReset:
                    self._cancel(link, ev.stream_id)
            except Exception as exc:  # one stream's failure is that stream's; the link serves on
                self._stream_failed(link, ev, exc)

    def _stream_failed(self, link: LinkBase, ev: Event, exc: Exception) -> None:
        sid = getattr(ev, "stream_id", 0)
        log.error("%s: stream %d failed; ending that stream only", self.node_id, sid, exc_info=exc)
        self._cancel(link, sid)
        link.reset_if_open(sid, ErrorCode.INTERNAL, "internal error in the worker")

    def _begin(self, link: LinkBase, frame: Frame) -> None:
        call = WorkCall(link, frame.stream_id, frame)
        call.release = functools.partial(self._grant, link)
        model = self.models.get(call.meta.model)
        refusal = self._refusal(call, model)
        if refusal is not None:
            call.fail(*refusal)
            call.done()  # the slot comes back even when the stream was already reset (CANCEL in this read)
            return
        assert model is not None  # _refusal refuses an unknown model
        # An async job beyond capacity (another queue node used the slot its credit stood for) waits
        # in _run for a slot: refused, it would go back to the queue having spent one of its attempts,
        # and the credit coming straight back would bring it (or another) back at once.
        task = asyncio.get_running_loop().create_task(self._run(model, call))
        key = (link, frame.stream_id)
        self._tasks[key] = (task, call)
        # Cleanup as a done-callback, not a `finally`: a task cancelled before its first step (its
        # CANCEL came in the same read as its REQUEST) never runs its body, but this always runs.
        task.add_done_callback(functools.partial(self._finished, key, call))

    def _refusal(self, call: WorkCall, model: Model | None) -> tuple[int, str] | None:
        """Why this request is answered with an error at once, or None to run it."""
        if model is None:
            return ErrorCode.UNKNOWN_MODEL, f"this worker does not serve {call.meta.model!r}"
        if self._draining:
            return ErrorCode.SHUTTING_DOWN, "worker draining"
        if len(self._tasks) >= self.config.capacity and not call.job_id:  # several queue nodes share our slots
            return ErrorCode.NO_CAPACITY, "all slots of this worker are busy"
        return None

    async def _run(self, model: Model, call: WorkCall) -> None:
        REQUEST_ID.set(call.request_id)  # this task's log lines (the handler's too) name the request
        try:
            async with self._slots:
                await model(call)
            if not call.finished:
                call.end() if call.started else call.respond(b"")
        except asyncio.CancelledError:
            call.cancelled = True
        except HandlerError as exc:
            call.fail(exc.code, exc.message, exc.param, exc.retry_after_ms)
        except AnswerClosed as exc:
            log.error("handler %s wrote after its answer was complete: %s", call.meta.model, exc)
        except Exception as exc:
            log.exception("handler %s failed", call.meta.model)
            call.fail(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _finished(self, key: tuple[LinkBase, int], call: WorkCall, task: asyncio.Task[None]) -> None:
        """The call's task is over, however it ended (also cancelled before it ever ran)."""
        if self._tasks.get(key, (None,))[0] is task:
            del self._tasks[key]
        call.done()

    def _cancel(self, link: LinkBase, sid: int) -> None:
        entry = self._tasks.get((link, sid))
        if entry is not None:
            self.cancelled += 1
            entry[1].cancelled = True
            entry[0].cancel()

    def _grant(self, link: LinkBase) -> None:
        """A slot freed. Slots freed in the same loop iteration go back as one CREDIT(n), written
        together with the answers that freed them (the answers' flush is scheduled after this)."""
        self._freed[link] = self._freed.get(link, 0) + 1
        if not self._grant_scheduled:
            self._grant_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_grants)

    def _send_grants(self) -> None:
        self._grant_scheduled = False
        freed, self._freed = self._freed, {}
        for link, n in freed.items():
            if link.is_up and not self._draining:
                link.conn.grant(n)
            link.flush()

    def _on_lost(self, link: LinkBase, exc: BaseException | None) -> None:
        log.warning("%s lost its queue node link (%s)", self.node_id, exc or "closed")
        for (lk, _sid), (task, call) in list(self._tasks.items()):
            if lk is link:
                call.cancelled = True
                task.cancel()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            self._send_heartbeats()

    def _send_heartbeats(self) -> None:
        cap = self.config.capacity
        meta = HeartbeatMeta(self.active, cap, self.healthy, self.active / max(cap, 1))
        for r in self._redialers:
            if r.link is not None and r.link.is_up:
                r.link.send(Frame(FrameType.HEARTBEAT, meta=meta))

    # -- shutdown ----------------------------------------------------------------------------------

    async def drain(self, timeout: float = 30.0) -> None:
        """Accept nothing new, finish what runs (up to `timeout`), then close every link."""
        self._draining = True
        for r in self._redialers:
            if r.link is not None and r.link.is_up:
                r.link.conn.goaway(ErrorCode.NO_ERROR, "worker draining")
                r.link.flush()
        running = [t for t, _ in self._tasks.values()]
        if running:
            _done, late = await asyncio.wait(running, timeout=timeout)
            for t in late:
                t.cancel()
        await self.stop()

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for t, _ in list(self._tasks.values()):
            t.cancel()
        await asyncio.gather(*(r.stop() for r in self._redialers), return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
