"""What the queue node keeps in memory: a record per connected worker (`WorkerEntry`), per model
(`ModelEntry`), per sync request in flight (`Call`), per request being classified (`FilterCheck`)
and per async job it dispatched (`RunningJob`). The records point at each other, so they live
together, below every module that acts on them: of the node's own modules only the line
(`scheduler`) and the measurements (`signals`) are imported here.

A worker's free slots are its link's send credit (SPEC §7): the worker grants one CREDIT per slot
that frees, so "has a free slot" is `link.conn.send_credit > 0`, kept by the core, never guessed.
Each model keeps a bounded, tenant-fair line of sync requests waiting for a slot (`FairLine`).

A call lives in memory only (DESIGN "Two contracts": no store on the sync path). Until the worker's
first response frame it keeps the request frames it forwarded, so that it can be retried once on
another worker (DESIGN: "before the first response byte ... once; after it, never"). Timing follows
DESIGN "Timing users can see": `wait` (queued before dispatch), `worker-rtt` (dispatch written ->
worker's answer received), `queue-overhead` (residence minus both), `work` (as the worker reports).
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Final

from casola.queue.scheduler import FairLine, pick_sync
from casola.queue.signals import ModelSignals
from casola.wire import EndMeta, ErrorMeta, Frame, FrameType, ResponseMeta

if TYPE_CHECKING:
    from asyncio import TimerHandle

    from casola.filter.base import Policy
    from casola.net.link import LinkBase
    from casola.store import Job
    from casola.wire import Buffer, RequestMeta

__all__ = ["PENDING", "RETAIN_MAX", "Call", "FilterCheck", "ModelEntry", "RunningJob", "WorkerEntry"]

PENDING: Final = -1.0  # Server-Timing value of a filter that had not finished: rendered desc="pending"
RETAIN_MAX = 64 * 1024 * 1024  # request bytes kept for a retry; a bigger request is not retried
HOLD_MAX = 16 * 1024 * 1024  # answer bytes held for a verdict (policy hold); more ends the request


class WorkerEntry:
    """One connected worker (one link)."""

    __slots__ = (
        "calls",
        "capacity",
        "healthy",
        "jobs",
        "link",
        "load",
        "models",
        "node_id",
        "pool",
        "region",
        "reserved",
    )

    def __init__(self, link: LinkBase, node_id: str, models: list[str], capacity: int, pool: str, region: str) -> None:
        self.link = link
        self.node_id = node_id
        self.models = models
        self.capacity = capacity
        self.pool = pool or "shared"
        self.region = region
        self.healthy = True
        self.load = 0.0
        self.calls: dict[int, Call] = {}  # worker-side stream id -> call
        self.jobs: dict[int, RunningJob] = {}  # worker-side stream id -> async job
        self.reserved = 0  # slots promised to job claims still in flight

    @property
    def serving(self) -> bool:
        """Takes new work: connected, not draining (its GOAWAY), healthy (its HEARTBEAT)."""
        return self.link.is_up and self.healthy

    @property
    def free(self) -> int:
        return self.link.conn.send_credit - self.reserved if self.serving else 0


class ModelEntry:
    """One model: its workers, its waiting sync requests and its signals."""

    __slots__ = ("name", "pending", "signals", "workers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.workers: list[WorkerEntry] = []
        self.pending: FairLine[Call] = FairLine()  # sync requests waiting for a slot
        self.signals = ModelSignals()

    def pick(self, exclude: WorkerEntry | None = None) -> WorkerEntry | None:
        """A worker for a sync request (sync pool first, then shared, then async), or None."""
        return pick_sync(self.workers, exclude)

    @property
    def slots(self) -> int:
        """Slots of the live workers: what a waiting sync request may get (any pool)."""
        return sum(w.capacity for w in self.workers if w.serving)

    @property
    def live_workers(self) -> int:
        """Workers that take new work (see WorkerEntry.serving)."""
        return sum(1 for w in self.workers if w.serving)


class Call:
    """One sync request as the node holds it: where it came from, where it runs, what it cost."""

    __slots__ = (
        "attempt",
        "deadline",
        "filter",
        "finished",
        "frames",
        "head_seen",
        "held",
        "held_s",
        "ing",
        "ing_sid",
        "meta",
        "model",
        "req_done",
        "retained",
        "start_by",
        "t_dispatch",
        "t_queued",
        "t_recv",
        "t_req_end",
        "timer",
        "w_sid",
        "wait",
        "worker",
    )

    def __init__(
        self,
        ing: LinkBase,
        ing_sid: int,
        meta: RequestMeta,
        model: ModelEntry,
        now: float,
        deadline_ms: int = 0,
        wait_ms: int = 0,
    ) -> None:
        """`deadline_ms`: the model's default deadline (the request's own wins); `wait_ms`: how long
        it may wait for a slot at most (the node's `sync_wait_ms`), deadline or not."""
        self.ing = ing
        self.ing_sid = ing_sid
        self.meta = meta
        self.model = model
        self.t_recv = now
        self.t_req_end = now  # when the request direction ended here (its END frame, or REQUEST's FLAG_END)
        self.t_queued = 0.0
        self.t_dispatch = 0.0
        self.wait = 0.0
        deadline_ms = meta.deadline_ms or deadline_ms  # the request's own, else the model's default
        self.deadline = now + deadline_ms / 1000 if deadline_ms else 0.0
        self.start_by = now + wait_ms / 1000 if wait_ms else 0.0
        self.filter: FilterCheck | None = None
        self.held = False  # waiting for the filter's verdict before dispatch (policy block)
        self.held_s = 0.0  # how long it waited for it: the filter's stage, not the node's overhead
        self.finished = False  # answered (or failed): a later verdict is recorded, not acted on
        self.frames: list[Frame] = []  # request frames seen so far (REQUEST first), for forwarding/retry
        self.retained = 0  # their payload bytes
        self.req_done = False  # the request direction has ended
        self.head_seen = False  # the worker's RESPONSE arrived: no more retries
        self.attempt = 0
        self.worker: WorkerEntry | None = None
        self.w_sid = 0
        self.timer: TimerHandle | None = None

    def keep(self, frame: Frame) -> bool:
        """Remember a request frame (to forward it later, or for a retry); False once the request
        has grown past RETAIN_MAX, after which nothing more is kept and it cannot be retried."""
        self.retained += len(frame.payload)
        if self.retained > RETAIN_MAX:
            self.frames.clear()
            return False
        self.frames.append(frame)
        return True

    @property
    def start_limit(self) -> float:
        """When it must have started: the earlier of its deadline and its wait bound; 0.0: never."""
        d, w = self.deadline, self.start_by
        return min(d, w) if d and w else d or w

    @property
    def retryable(self) -> bool:
        """Not answered yet, not retried yet, and every request frame still at hand."""
        return not self.head_seen and self.attempt == 0 and bool(self.frames)  # keep() empties it past RETAIN_MAX

    def answer(self, frame: Frame, t_answer: float, now: float) -> Frame:
        """The worker's answer frame (RESPONSE, DATA, END, ERROR) as the ingress gets it: on the
        ingress's stream id, the same payload, and in the frames that carry timing the node's stages
        first, then the worker's (work), then the filter's."""
        ft, meta = frame.type, frame.meta
        if ft is FrameType.DATA:
            return Frame(ft, self.ing_sid, None, frame.payload, frame.flags)
        assert isinstance(meta, ResponseMeta | EndMeta | ErrorMeta)
        timing: dict[str, float] = {}
        if self.meta.trace:  # SPEC §4.3: timings are collected and returned only when asked
            timing = self.timing(t_answer, now, None)
            timing.update(meta.timing)
            if self.filter is not None:
                timing["filter"] = self.filter.dur_ms
        out: ResponseMeta | EndMeta | ErrorMeta
        if isinstance(meta, ResponseMeta):
            out = ResponseMeta(meta.content_type, meta.headers, timing)
        elif isinstance(meta, EndMeta):
            out = EndMeta(timing, meta.fence, meta.trailers)
        else:
            out = ErrorMeta(meta.code, meta.message, meta.retry_after_ms, meta.param, timing)
        return Frame(ft, self.ing_sid, out, frame.payload, frame.flags)

    def refusal_timing(self, now: float) -> dict[str, float]:
        """The stages of a request the node answers itself (refused, expired, aborted), if traced."""
        if not self.meta.trace:
            return {}
        end = self.t_req_end
        start = (end if end < now else now) if self.req_done else now  # all of it upload until the END
        wait, held = self._after(start)
        overhead = now - start - wait - held
        t = {"queue-overhead": overhead * 1000 if overhead > 0.0 else 0.0, "wait": wait * 1000}
        if self.filter is not None:
            t["filter"] = self.filter.dur_ms
        return t

    def _after(self, start: float) -> tuple[float, float]:
        """The wait for a slot and the filter's hold that fall after `start`: before it the client
        was still sending the body (its `upload`, which the ingress reports)."""
        wait, held = self.wait, self.held_s
        if upload := start - self.t_recv:
            wait = wait - upload if wait > upload else 0.0
            held = held - upload if held > upload else 0.0
        return wait, held

    def timing(self, t_answer: float, now: float, work: float | None) -> dict[str, float]:
        """Stage durations in milliseconds, in Server-Timing order: the worker's answer arrived at
        `t_answer` and is forwarded `now`; `work` is what the worker reported (ms), if it did.

        The stages count from when the request was complete here (DESIGN "Timing users can see"):
        the time its body was still arriving is the client's `upload` (the ingress reports it), so
        a wait or a worker round trip that overlapped it counts only its part after."""
        start = self.t_req_end
        wait, held = self._after(start)
        dispatched = self.t_dispatch
        rtt = t_answer - (dispatched if dispatched > start else start)
        overhead = (now - start) - wait - rtt - held
        t = {
            "queue-overhead": overhead * 1000 if overhead > 0.0 else 0.0,
            "wait": wait * 1000,
            "worker-rtt": rtt * 1000,
        }
        if work is not None:
            t["work"] = work
        return t


class FilterCheck:
    """One request's classification."""

    __slots__ = (
        "call", "decided", "dur_ms", "held", "held_bytes", "parts", "policy", "size", "started", "t0", "waiting"
    )  # fmt: skip

    def __init__(self, call: Call, policy: Policy) -> None:
        self.call, self.policy = call, policy
        self.held: list[tuple[Frame, float]] = []  # policy hold: the answer's frames and arrival, until the verdict
        self.held_bytes = 0
        self.parts: list[Buffer] = []
        self.size = 0
        self.started = self.decided = False
        self.waiting = 0
        self.t0 = 0.0
        self.dur_ms = PENDING

    def timing(self) -> float:
        """The `filter` stage as the response reports it: ms, or PENDING."""
        return self.dur_ms


class RunningJob:
    """A job this node dispatched and has not seen the end of."""

    __slots__ = (
        "base_seq",
        "chunks",
        "content_type",
        "fence",
        "id",
        "model",
        "renewed",
        "size",
        "t0",
        "w_sid",
        "webhook",
        "worker",
    )

    def __init__(self, job: Job, worker: WorkerEntry, w_sid: int, now: float) -> None:
        self.id, self.fence, self.model = job.id, job.fence, job.model
        self.webhook = bool(job.webhook_url)
        self.base_seq = job.checkpoint_seq  # the worker counts from 1 on every dispatch
        self.worker, self.w_sid = worker, w_sid
        self.renewed = now
        self.t0 = perf_counter()  # for the service time
        self.chunks: list[Buffer] = []
        self.size = 0
        self.content_type = ""
