"""Closed-loop load generators for bench/overhead.py: HTTP/1.1 keep-alive clients and framed clients.

Each client owns one connection and keeps exactly one request in flight: the next request is written
from the callback that completes the previous one (no task or future per request). The load must not
compete with what it measures on a 2-vCPU machine, so the clients are cheap:

- uvloop, `asyncio.Protocol` / `BufferedProtocol`, TCP_NODELAY;
- request bytes are built once and written with `writelines` (header block + payload);
- HTTP responses are parsed by `httptools.HttpResponseParser`; only the status, `Server-Timing`,
  `Retry-After` and the body length are kept, and the body bytes only for the first `verify`
  responses of each connection, which are compared byte for byte;
- framed responses (`!II` header, bench/floor.py) reuse the floor's receive path;
- each completion stores `perf_counter_ns()` latency, status and the raw `Server-Timing` bytes into
  preallocated lists; percentiles and Server-Timing parsing happen after the run (numpy).

`drive()` runs the phases: connect, warm-up, measure (only completions inside the window are
recorded), then stop and wait until every client is idle. A connection that the server closes (or
answers without keep-alive) is replaced by a new one, counted in `reconnects`.

`DummyHttp` is the stand-in server of `overhead.py --self-test`, which proves this client without casola.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
import numpy as np
from floor import HEADER, SMALL_WRITE, FrameProtocol, nodelay

Connect = Callable[["Run", int], Awaitable["Client"]]  # opens the connection of one client slot
Hook = Callable[[str], None]  # called with "begin", "tick" (about once a second while measuring), "end"
perf_ns = time.perf_counter_ns


class Run:
    """Shared state of one closed-loop run: phase flags, preallocated per-request records, counters."""

    def __init__(self, connect: Connect, cap: int = 1 << 16) -> None:
        self.connect = connect
        self.recording = self.stopping = False
        self.cap, self.n = cap, 0
        self.lat: list[int] = [0] * cap  # ns, per completion inside the window
        self.code: list[int] = [0] * cap  # HTTP status; 200/0 for frames
        self.timing: list[bytes | None] = [None] * cap  # raw Server-Timing value
        self.clients: list[Client | None] = []
        self.busy = 0  # clients not yet idle after stop
        self.idle: asyncio.Future[None] | None = None
        self.t_begin = self.t_end = 0
        self.cpu = 0.0  # this process's CPU seconds inside the window
        self.errors: dict[str, int] = {}
        self.reconnects = self.verified = self.n429 = self.no_retry_after = 0

    def record(self, ns: int, code: int, timing: bytes | None) -> None:
        n = self.n
        if n == self.cap:
            self.lat += [0] * self.cap
            self.code += [0] * self.cap
            self.timing += [None] * self.cap
            self.cap *= 2
        self.lat[n], self.code[n], self.timing[n] = ns, code, timing
        self.n = n + 1

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def client_idle(self) -> None:
        self.busy -= 1
        if self.busy == 0 and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    def respawn(self, slot: int) -> None:
        """Replace the client of `slot` by a fresh connection (the server closed the old one)."""
        self.reconnects += 1
        asyncio.get_running_loop().create_task(self._respawn(slot))

    async def _respawn(self, slot: int) -> None:
        for attempt in range(50):
            try:
                client = await self.connect(self, slot)
                break
            except OSError as e:
                self.error(f"reconnect: {type(e).__name__}")
                await asyncio.sleep(0.01 * (attempt + 1))
        else:
            self.clients[slot] = None
            if self.stopping:
                self.client_idle()
            return
        self.clients[slot] = client
        if self.stopping:
            client.retire()
            self.client_idle()
        else:
            client.start()


class Client:
    """Closed-loop behaviour shared by the HTTP and the framed client."""

    transport: asyncio.Transport

    def __init__(self, run: Run, slot: int, verify: int) -> None:
        self.run, self.slot, self.verify_left = run, slot, verify
        self.t0 = 0
        self.inflight = self.retired = False
        self.reusable = True

    def start(self) -> None:
        self.inflight = True
        self.t0 = perf_ns()
        self.write_request()

    def write_request(self) -> None:
        raise NotImplementedError

    def finish(self, code: int, timing: bytes | None) -> None:
        t = perf_ns()
        run = self.run
        if run.recording:
            run.record(t - self.t0, code, timing)
        self.inflight = False
        if run.stopping:
            run.client_idle()
        elif self.reusable:
            self.start()
        else:
            self.retire()
            run.respawn(self.slot)

    def retire(self) -> None:
        self.retired = True
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.retired:
            return
        self.retired = True
        run = self.run
        if self.inflight:
            self.inflight = False
            run.error("connection lost with a request in flight")
            if run.stopping:
                run.client_idle()
                return
        if not run.stopping:
            run.respawn(self.slot)


class HttpClient(Client, asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; `request` is the prebuilt (head, body) pair."""

    def __init__(self, run: Run, slot: int, request: tuple[bytes, bytes], verify: int) -> None:
        super().__init__(run, slot, verify)
        self.request = request
        self.expect = request[1]
        self.parser = httptools.HttpResponseParser(self)
        self.st: bytes | None = None
        self.retry_after: bytes | None = None
        self.body_len = 0
        self.chunks: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        nodelay(transport)

    def write_request(self) -> None:
        self.transport.writelines(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.run.error(f"HTTP parse error: {e}")
            self.reusable = False
            self.transport.close()

    def on_message_begin(self) -> None:
        self.st = self.retry_after = None
        self.body_len = 0
        self.chunks = [] if self.verify_left > 0 else None

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"server-timing":
            self.st = value if self.st is None else self.st + b"," + value
        elif name == b"retry-after":
            self.retry_after = value

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        if self.chunks is not None:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        code = self.parser.get_status_code()
        run = self.run
        if code == 200:
            if self.body_len != len(self.expect):
                run.error(f"200 with a body of {self.body_len} bytes, expected {len(self.expect)}")
            elif self.chunks is not None:
                self.verify_left -= 1
                run.verified += 1
                if b"".join(self.chunks) != self.expect:
                    run.error("200 with a body that differs from the request")
        elif code == 429:
            run.n429 += 1
            if not self.retry_after:
                run.no_retry_after += 1
        self.reusable = self.parser.should_keep_alive()
        self.finish(code, self.st)


class FrameClient(Client, FrameProtocol):
    """One framed connection to the floor; the request id is the client's slot (one in flight)."""

    def __init__(self, run: Run, slot: int, payload: bytes, verify: int) -> None:
        Client.__init__(self, run, slot, verify)
        FrameProtocol.__init__(self)
        self.payload = payload
        head = HEADER.pack(len(payload), slot)
        self.request: tuple[bytes, ...] = (head + payload,) if len(payload) < SMALL_WRITE else (head, payload)

    def write_request(self) -> None:
        self.transport.writelines(self.request)

    def on_frame(self, rid: int, payload: bytearray) -> None:
        ok = rid == self.slot and len(payload) == len(self.payload)
        if ok and self.verify_left > 0:
            self.verify_left -= 1
            self.run.verified += 1
            ok = payload == self.payload
        if not ok:
            self.run.error("frame echo differs from the request")
        self.finish(200 if ok else 0, None)


def http_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, bytes]:
    """The prebuilt (head, body) of a POST with Content-Length."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode("latin-1"), body


def http_connector(host: str, port: int, request: tuple[bytes, bytes], verify: int = 2) -> Connect:
    async def connect(run: Run, slot: int) -> Client:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: HttpClient(run, slot, request, verify), host, port)
        return proto

    return connect


def frame_connector(host: str, port: int, payload: bytes, verify: int = 2) -> Connect:
    async def connect(run: Run, slot: int) -> Client:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: FrameClient(run, slot, payload, verify), host, port)
        return proto

    return connect


async def drive(
    connect: Connect,
    clients: int,
    warmup_s: float,
    measure_s: float,
    hook: Hook | None = None,
    connect_batch: int = 64,
) -> Run:
    """Connect `clients` closed-loop clients, warm up, record for `measure_s`, then stop them all."""
    loop = asyncio.get_running_loop()
    run = Run(connect)
    run.clients = [None] * clients
    for lo in range(0, clients, connect_batch):  # batches: no SYN storm against a small accept backlog
        got = await asyncio.gather(*(connect(run, i) for i in range(lo, min(clients, lo + connect_batch))))
        run.clients[lo : lo + len(got)] = got
    run.busy = clients
    run.idle = loop.create_future()
    for c in run.clients:
        assert c is not None
        c.start()
    await asyncio.sleep(warmup_s)
    cpu0 = time.process_time()
    run.t_begin = perf_ns()
    run.recording = True
    if hook:
        hook("begin")
    deadline = run.t_begin + int(measure_s * 1e9)
    while (left := deadline - perf_ns()) > 0:
        await asyncio.sleep(min(1.0, left / 1e9))
        if hook and perf_ns() < deadline:
            hook("tick")
    run.recording, run.stopping = False, True
    run.t_end = perf_ns()
    run.cpu = time.process_time() - cpu0
    if hook:
        hook("end")
    try:
        await asyncio.wait_for(asyncio.shield(run.idle), 15.0)
    except TimeoutError:
        run.error(f"{run.busy} client(s) still busy 15 s after the stop")
    for c in run.clients:
        if c is not None and not c.retired:
            c.retire()
    await asyncio.sleep(0)  # let the transports close
    return run


def parse_server_timing(raw: bytes) -> dict[str, float]:
    """`name;dur=1.5, other;desc="x";dur=0.2` -> {name: ms}; entries without dur are left out."""
    out: dict[str, float] = {}
    for part in raw.split(b","):
        name, _, params = part.strip().partition(b";")
        for p in params.split(b";"):
            k, _, v = p.strip().partition(b"=")
            if k.strip().lower() == b"dur":
                try:
                    out[name.decode("latin-1")] = float(v.strip().strip(b'"'))
                except ValueError:
                    pass
    return out


def pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None


def summarize(run: Run) -> dict[str, Any]:
    """Latency percentiles (us) of the 200s, rates, status counts, Server-Timing p50s (us) and
    overhead = total - work per request (us), from the records inside the window."""
    n, window = run.n, (run.t_end - run.t_begin) / 1e9
    lat = np.array(run.lat[:n], dtype=np.int64) / 1e3
    code = np.array(run.code[:n], dtype=np.int64)
    ok = code == 200
    lat_ok = lat[ok]
    statuses = {int(k): int(v) for k, v in zip(*np.unique(code, return_counts=True), strict=True)}
    out: dict[str, Any] = {
        "n": n,
        "window_s": window,
        "ok": int(ok.sum()),
        "statuses": statuses,
        "req_s": float(ok.sum()) / window if window else 0.0,
        "all_s": n / window if window else 0.0,
        "p50_us": pct(lat_ok, 50),
        "p90_us": pct(lat_ok, 90),
        "p99_us": pct(lat_ok, 99),
        "mean_us": float(lat_ok.mean()) if len(lat_ok) else None,
        "client_cpu_ms_per_req": run.cpu * 1e3 / n if n else None,
        "errors": dict(run.errors),
        "reconnects": run.reconnects,
        "verified": run.verified,
        "n429_total": run.n429,
        "no_retry_after": run.no_retry_after,
    }
    if (~ok).any():
        out["other_p50_us"] = pct(lat[~ok], 50)
    raws = [(i, run.timing[i]) for i in np.flatnonzero(ok)]
    if any(raw is not None for _, raw in raws):
        entries: dict[str, list[float]] = {}
        over: list[float] = []
        for i, raw in raws:
            st = parse_server_timing(raw) if raw is not None else {}
            for k, v in st.items():
                entries.setdefault(k, []).append(v * 1e3)
            if "work" in st:
                over.append(float(lat[i]) - st["work"] * 1e3)
        out["server_timing_p50_us"] = {k: pct(np.array(v), 50) for k, v in entries.items()}
        out["server_timing_count"] = {k: len(v) for k, v in entries.items()}
        out["overhead_p50_us"] = pct(np.array(over), 50)
        out["overhead_p99_us"] = pct(np.array(over), 99)
    return out


class DummyHttp(asyncio.Protocol):
    """A tiny in-process stand-in for the ingress: echoes POST bodies with a fake Server-Timing, honours
    X-Casola-Param-Delay-Ms, answers 429 + Retry-After beyond `bound` pending (and closes the connection
    after every 50th of those), flips the first byte when `X-Test-Corrupt` is sent; GET is /healthz."""

    bound, pending, served = 1 << 30, 0, 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t, self.parser = cast(asyncio.Transport, transport), httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body: list[bytes] = []
        self.delay, self.corrupt = 0.0, False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"x-casola-param-delay-ms":
            self.delay = float(value) / 1e3
        self.corrupt |= name == b"x-test-corrupt"

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        cls, body = DummyHttp, b"".join(self.body)
        cls.served += 1
        if self.parser.get_method() == b"GET":
            self.answer(200, b'{"models": {"echo": {"workers": 1}}}', b"")
        elif cls.pending >= cls.bound:
            self.answer(429, b"busy", b"Retry-After: 1\r\n" + (b"" if cls.served % 50 else b"Connection: close\r\n"))
        else:
            cls.pending += 1
            body = b"!" + body[1:] if self.corrupt else body
            st = b"Server-Timing: ingress;dur=0.120, queue-overhead;dur=0.045, wait;dur=0.000, work;dur=%.3f\r\n"
            asyncio.get_running_loop().call_later(self.delay, self.answer, 200, body, st % (self.delay * 1e3), True)

    def answer(self, code: int, body: bytes, extra: bytes, done: bool = False) -> None:
        DummyHttp.pending -= done
        if not self.t.is_closing():
            self.t.writelines((b"HTTP/1.1 %d X\r\n%bContent-Length: %d\r\n\r\n" % (code, extra, len(body)), body))
            if b"Connection: close" in extra:
                self.t.close()
