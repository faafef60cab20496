"""The handler interface every model implements, and the adapter for blocking (CPU/GPU) code.

A model is an object with a `name` and `async def __call__(call: WorkCall)`. Inference libraries
block; `BlockingModel` runs them in the runtime's thread pool one output piece at a time, so the
event loop never stalls and a CANCEL stops the work between pieces (`cancelled` is set).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor
from typing import NamedTuple, Protocol, cast

from casola.wire import Buffer, RequestMeta
from casola.wire.meta import Param
from casola.worker.call import WorkCall

__all__ = ["BlockingModel", "Model", "Reply", "param_bool", "param_float", "param_int", "param_str"]


class Model(Protocol):
    name: str

    async def __call__(self, call: WorkCall) -> None: ...


class Reply(NamedTuple):
    """An answer whose content type (and headers) depend on the request: what `run_request` returns.

    `body` is the whole answer, or an iterable of pieces streamed as they are produced."""

    content_type: str
    body: Buffer | Iterable[Buffer]
    headers: dict[str, str] | None = None


_DONE = object()


class BlockingModel:
    """Base for handlers whose work blocks. Subclasses implement `run`.

    `run(body, params, cancelled)` returns the whole answer, or an iterable of pieces (streamed as
    DATA frames as each is produced). Each piece is produced in the thread pool; on CANCEL no
    further piece is asked for, `cancelled` is set and a generator is closed (its `finally` runs).
    """

    name = "blocking"
    content_type = "application/octet-stream"
    executor: Executor | None = None  # set by the runtime

    def run(self, body: Buffer, params: Mapping[str, Param], cancelled: threading.Event) -> Buffer | Iterable[Buffer]:
        raise NotImplementedError

    def run_request(
        self, body: Buffer, meta: RequestMeta, cancelled: threading.Event
    ) -> Reply | Buffer | Iterable[Buffer]:
        """Like `run`, with the whole request head (content type, params); a `Reply` sets the answer's
        content type and headers per request. Runs in the thread pool."""
        return self.run(body, meta.params, cancelled)

    async def __call__(self, call: WorkCall) -> None:
        pool = self.executor or _default_pool()
        body = await call.body()
        cancelled = threading.Event()
        step: concurrent.futures.Future[object] = pool.submit(self.run_request, body, call.meta, cancelled)
        content_type, headers = self.content_type, None
        try:
            out = await asyncio.wrap_future(step)
            if isinstance(out, Reply):
                content_type, headers, out = out.content_type, out.headers, out.body
            if isinstance(out, bytes | bytearray | memoryview):
                call.respond(out, content_type, headers)
                return
            call.start(content_type, headers)
            await _Pieces(iter(cast(Iterable[Buffer], out)), cancelled, pool).stream(call)
            call.end()
        except asyncio.CancelledError:
            cancelled.set()
            raise


class _Pieces:
    """A blocking generator drained by one pool thread that runs ahead of the link by up to AHEAD
    pieces: the model computes its next piece (token) while the loop sends the last one, and a piece
    costs one thread-to-loop handoff, not a pool round trip. The thread checks `cancelled` between
    pieces and closes the generator itself (its `finally` runs in the thread that ran it)."""

    AHEAD = 64

    def __init__(self, it: Iterator[Buffer], cancelled: threading.Event, pool: Executor) -> None:
        self.it, self.cancelled = it, cancelled
        self.loop = asyncio.get_running_loop()
        self.ready: deque[object] = deque()
        self.wake: asyncio.Future[None] | None = None
        self.room = threading.Semaphore(self.AHEAD)
        pool.submit(self._produce)

    def _produce(self) -> None:
        it, cancelled, room = self.it, self.cancelled, self.room
        try:
            for piece in it:
                if cancelled.is_set():
                    return
                while not room.acquire(timeout=0.1):  # the link is backed up: wait, unless cancelled
                    if cancelled.is_set():
                        return
                self.loop.call_soon_threadsafe(self._push, piece)
            self.loop.call_soon_threadsafe(self._push, _DONE)
        except BaseException as exc:  # the handler failed mid-stream: re-raised on the loop
            self.loop.call_soon_threadsafe(self._push, exc)
        finally:
            _close(it)

    def _push(self, item: object) -> None:
        self.ready.append(item)
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    async def stream(self, call: WorkCall) -> None:
        ready = self.ready
        while True:
            while not ready:
                self.wake = self.loop.create_future()
                await self.wake
            item = ready.popleft()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            self.room.release()
            await call.write(item)  # type: ignore[arg-type]


def _close(it: Iterator[Buffer]) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _default_pool() -> Executor:
    """For a BlockingModel used outside a WorkerRuntime (which sets `executor`)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="casola-handler")
    return _POOL


_POOL: Executor | None = None


def _param(params: Mapping[str, Param], name: str) -> Param:
    return params.get(name, params.get(name.replace("-", "_")))


def param_float(params: Mapping[str, Param], name: str, default: float = 0.0) -> float:
    """A numeric parameter; HTTP headers deliver strings, frames may deliver numbers.

    Raises:
        HandlerError: the value is not a number.
    """
    from casola.worker.call import HandlerError

    v = _param(params, name)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        raise HandlerError(f"parameter {name!r} must be a number, got {v!r}", param=name) from None


def param_str(params: Mapping[str, Param], name: str, default: str = "") -> str:
    v = _param(params, name)
    return default if v is None else str(v)


def param_int(params: Mapping[str, Param], name: str, default: int = 0) -> int:
    return int(param_float(params, name, default))


def param_bool(params: Mapping[str, Param], name: str, default: bool = False) -> bool:
    v = _param(params, name)
    if v is None:
        return default
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)
