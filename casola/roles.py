"""Running each role as a process: `casola up`, `casola ingress`, `casola queue`, `casola worker`.

Each runs on uvloop (when installed) until SIGINT/SIGTERM. A worker drains on SIGTERM (finishes what
runs, accepts nothing new); `casola up` passes SIGTERM on to its workers and waits for them.
`casola up --tls` serves HTTPS with development certificates from `<state-dir>/certs` (`casola.certs`).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from casola.auth import SCOPE_INGRESS, SCOPE_RUN, SCOPE_WORKER, KeyStore
from casola.banner import banner, try_hint
from casola.certs import DEFAULT_HOSTS, make_dev_certs
from casola.config import Config, WorkerSpec, check_worker_models
from casola.files import write_atomic
from casola.flow.spec import describe
from casola.net.loop import loop_name
from casola.net.loop import run as run_loop
from casola.opsmetrics import (
    Exposition,
    process_registry,
    render,
    serve_metrics,
    split_address,
    write_queue,
    write_worker,
)
from casola.queue.node import QueueConfig, QueueNode
from casola.startup import StartupError, explain, start_or_explain, state_dir_ready
from casola.worker import Echo, Model, Steps, WorkerConfig, WorkerRuntime

if TYPE_CHECKING:
    from casola.auth import Verifier
    from casola.flow import Engine
    from casola.ingress.server import Ingress
    from casola.ingress.upstream import Upstream

__all__ = ["BUILTIN_MODELS", "StartupError", "run"]

log = logging.getLogger("casola")

BUILTIN_MODELS: dict[str, type] = {"echo": Echo, "steps": Steps}
PARENT_ENV = "CASOLA_PARENT_PID"  # set for the workers of `casola up`: they end when it does


def run(args: argparse.Namespace, config: Config, state_dir: Path) -> int:
    """Run the role `args.command` until it is signalled; `config` has the flags applied
    (`casola.cli.apply_overrides`).

    Raises:
        ConfigError: what a role checks before it starts (`casola up`: its workers' models).
        StartupError: it cannot start (an address in use, an unwritable state dir, a job store it
            cannot open): one line for the user.
    """
    main = {"up": _up, "ingress": _ingress, "queue": _queue, "worker": _worker}[args.command]
    try:
        return run_loop(main(args, config, state_dir))
    except KeyboardInterrupt:
        return 130


async def _until_signalled() -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got: list[int] = []

    def on_signal(sig: int) -> None:
        got.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    return got[0]


def _queue_config(queue: QueueConfig, state_dir: Path) -> QueueConfig:
    """Async jobs default to an SQLite store and a webhook signing key in the state directory."""
    jobs = queue.jobs
    if not jobs.store:
        jobs = msgspec.structs.replace(jobs, store=f"sqlite:///{(state_dir / 'jobs.db').resolve()}")
    if not jobs.webhook_key:
        jobs = msgspec.structs.replace(jobs, webhook_key=str(state_dir / "webhook-key.pem"))
    return msgspec.structs.replace(queue, jobs=jobs)


def _ingress_credential(ks: KeyStore) -> str:
    return ks.ensure_key("ingress-key", "_system", [SCOPE_INGRESS], "ingress to queue nodes")


# -- casola up ---------------------------------------------------------------------------------------


async def _up(args: argparse.Namespace, config: Config, state_dir: Path) -> int:
    from casola.ingress.upstream import Upstream

    check_worker_models(config, BUILTIN_MODELS)  # ConfigError before anything starts (cli: exit 2)
    state_dir_ready(state_dir)
    ca: Path | None = None
    if getattr(args, "tls", False):
        config, ca = _with_dev_certs(config, state_dir)
    ks = KeyStore(state_dir)
    verifier = ks.verifier()
    ks.ensure_key("dev-api-key", "dev", [SCOPE_RUN], "development key (casola up)")  # the banner names its file
    worker_key = ks.ensure_key("worker-key", "_workers", [SCOPE_WORKER], "local workers")
    node = QueueNode(_queue_config(config.queue, state_dir), verifier)
    await start_or_explain(node.start(), config.queue.listen)
    engine = await _start_workflows(config, node)
    upstream = Upstream(config.ingress.queue_nodes, _ingress_credential(ks), config.ingress.node_id)
    upstream.add_memory(node.memory_dialer, config.queue.region)
    ingress = _up_ingress(config, verifier, upstream, node)
    ingress.metrics.realtime = engine.turn_stats if engine is not None else None
    await upstream.start(wait=5.0)
    try:
        await start_or_explain(ingress.start(), config.ingress.http, config.ingress.frames)
    except StartupError:
        await upstream.stop()
        await _stop_workflows(engine)
        await node.stop()
        raise
    queue_addr = f"{config.queue.listen.rpartition(':')[0]}:{node.port}"
    workers = _LocalWorkers(
        config.workers, queue_addr, state_dir, worker_key, config.models_dir, args.config or "",
        log_args=["--log-level", config.log_level.lower(), "--log-format", config.log_format],
    )  # fmt: skip
    workers.start()
    http_port, *rest = ingress.ports
    endpoints = {
        "http": f"{'https' if ingress.tls else 'http'}://{config.ingress.http.rpartition(':')[0]}:{http_port}",
        "frames": f"{config.ingress.frames.rpartition(':')[0]}:{rest[0]}" if rest else "",
        "queue": queue_addr,
        "loop": loop_name(),
    }
    write_atomic(state_dir / "endpoints.json", json.dumps(endpoints).encode())  # 0600, like every state file
    banner(endpoints, state_dir, ca, try_hint(config))
    try:
        await _until_signalled()
    finally:
        log.info("casola up: stopping")
        ingress.draining = True  # /readyz: 503 while the workers drain
        await _stop_workflows(engine)  # runs in flight finish first: their steps need the workers
        await workers.stop()
        await ingress.stop()
        await upstream.stop()
        await node.stop()
    return 0


async def _start_workflows(config: Config, node: QueueNode) -> Engine | None:
    """The workflow engine of this queue node's process, when the config declares workflows."""
    if not config.workflows:
        return None
    from casola.flow import Engine

    engine = Engine(config.workflows, node.connect_member, config.queue.node_id, config.queue.outbound_allow)
    await engine.start()
    return engine


async def _stop_workflows(engine: Engine | None) -> None:
    if engine is not None:
        await engine.stop()


def _up_ingress(config: Config, verifier: Verifier, upstream: Upstream, node: QueueNode) -> Ingress:
    """The ingress of `casola up`, reading the in-process queue node: /readyz, /healthz, /metrics."""
    from casola.ingress.server import Ingress

    ingress = Ingress(config.ingress, verifier, upstream)
    ingress.queue_snapshot = ingress.metrics.queue_snapshot = node.registry.snapshot
    ingress.queue_signals = ingress.metrics.queue_signals = node.signals
    ingress.metrics.queue_stats = node.snapshot
    ingress.metrics.served = node.registry.models  # label values: the models the node knows, looked up live
    ingress.metrics.require_key = config.metrics_key
    ingress.workflows = [describe(name, wf) for name, wf in config.workflows.items()]
    ingress.required_models = sorted({*config.queue.models, *(m for spec in config.workers for m in spec.models)})
    return ingress


def _with_dev_certs(config: Config, state_dir: Path) -> tuple[Config, Path]:
    """`config` with the ingress on HTTPS with `<state-dir>/certs` (made or reused), and the CA's path."""
    host = config.ingress.http.rpartition(":")[0].strip("[]")
    hosts = [*DEFAULT_HOSTS, *([host] if host not in ("", "0.0.0.0", "::", *DEFAULT_HOSTS) else [])]
    certs = make_dev_certs(state_dir / "certs", hosts)
    ingress = msgspec.structs.replace(config.ingress, tls_cert=str(certs.cert), tls_key=str(certs.key))
    return msgspec.structs.replace(config, ingress=ingress), certs.ca


# `casola worker` exits with this status when its configuration is wrong (an unknown model, a bad
# file, bad flags: argparse's status too); restarting it cannot help.
EXIT_CONFIG: Final = 2
# Restart delays of a worker that keeps crashing: doubled from the first up to the cap (systemd's
# RestartSteps/RestartMaxDelaySec and Kubernetes' CrashLoopBackOff back off the same way; 30 s
# keeps a worker whose GPU or queue node comes back in service soon enough).
RESTART_FIRST_S: Final = 1.0
RESTART_MAX_S: Final = 30.0
# A worker that ran this long was serving, not crash-looping: its next restart waits the first delay.
HEALTHY_RUN_S: Final = 10.0


def _restart_delay(previous: float | None, ran_s: float, first: float = RESTART_FIRST_S) -> float:
    """How long to wait before restarting a worker that ran `ran_s` seconds, the wait before its
    last restart having been `previous` (None: never restarted)."""
    if previous is None or ran_s >= HEALTHY_RUN_S:
        return first
    return min(previous * 2, RESTART_MAX_S)


class _LocalWorkers:
    """Worker processes of `casola up`; one that dies unexpectedly is restarted after a pause that
    grows while it keeps crashing, and one that exits with EXIT_CONFIG is not restarted.

    `command` runs instead of `python -m casola` (tests); `first_delay`: the first restart's wait;
    `log_args`: `casola worker` options passed on (`casola up`'s --log-level and --log-format)."""

    def __init__(
        self,
        specs: list[WorkerSpec],
        queue: str,
        state_dir: Path,
        credential: str,
        models_dir: str,
        config_file: str,
        *,
        command: Sequence[str] = (),
        first_delay: float = RESTART_FIRST_S,
        log_args: Sequence[str] = (),
    ) -> None:
        self._specs, self._queue, self._state_dir = specs, queue, state_dir
        self._config_file = str(Path(config_file).resolve()) if config_file else ""  # its [models.*] overrides
        self._models_dir = str(Path(models_dir).resolve())
        self._credential = credential
        self._command = list(command) or [sys.executable, "-m", "casola"]
        self._first_delay = first_delay
        self._log_args = list(log_args)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.starts: dict[int, int] = {}  # processes started per worker number, restarts included
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        for spec in self._specs:
            for _ in range(spec.count):
                n += 1
                self._tasks.append(loop.create_task(self._keep(spec, n)))

    def _argv(self, spec: WorkerSpec, n: int) -> list[str]:
        return [
            *self._command, "--state-dir", str(self._state_dir), "worker",
            "--queue", self._queue, "--models", ",".join(spec.models), "--capacity", str(spec.capacity),
            "--pool", spec.pool, "--node-id", f"worker-{n}", "--threads", str(spec.threads),
            *(["--config", self._config_file] if self._config_file else []),
            "--models-dir", self._models_dir, *self._log_args,
        ]  # fmt: skip

    async def _keep(self, spec: WorkerSpec, n: int) -> None:
        from casola.cli import MALLOC_ENV

        env = {**os.environ, **MALLOC_ENV, "CASOLA_WORKER_KEY": self._credential, PARENT_ENV: str(os.getpid())}
        loop = asyncio.get_running_loop()
        delay: float | None = None
        while not self._stopping:
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(*self._argv(spec, n), env=env)
            self.procs[n] = proc
            self.starts[n] = self.starts.get(n, 0) + 1
            rc = await proc.wait()
            if self._stopping:
                return
            if rc == EXIT_CONFIG:
                log.error("worker-%d exited with status %d (a configuration error, see above): not restarted", n, rc)
                return
            delay = _restart_delay(delay, loop.time() - started, self._first_delay)
            log.warning("worker-%d exited with %s; restarting in %g s", n, rc, delay)
            await asyncio.sleep(delay)

    async def stop(self, timeout: float = 15.0) -> None:
        self._stopping = True
        procs = [p for p in self.procs.values() if p.returncode is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout)
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- the roles alone ---------------------------------------------------------------------------------


async def _ingress(args: argparse.Namespace, config: Config, state_dir: Path) -> int:
    from casola.ingress.server import Ingress
    from casola.ingress.upstream import QueueNodeSpec, Upstream

    state_dir_ready(state_dir)
    ks = KeyStore(state_dir)
    nodes = list(config.ingress.queue_nodes)
    for item in args.queue_node:
        address, _, region = item.partition("@")
        nodes.append(QueueNodeSpec(address=address, region=region))
    if not nodes:
        nodes = [QueueNodeSpec(address=config.queue.listen)]
    upstream = Upstream(nodes, _ingress_credential(ks), config.ingress.node_id)
    ingress = Ingress(config.ingress, ks.verifier(), upstream)
    ingress.workflows = [describe(name, wf) for name, wf in config.workflows.items()]
    ingress.metrics.require_key = config.metrics_key
    ingress.metrics.serve(config.queue.models)  # the rest: once a queue node answers for them (2xx)
    await upstream.start(wait=2.0)
    try:
        await start_or_explain(ingress.start(), config.ingress.http, config.ingress.frames)
    except StartupError:
        await upstream.stop()
        raise
    log.info("ingress listening on %s (frames %s), queue nodes %s", config.ingress.http, config.ingress.frames, nodes)
    try:
        await _until_signalled()
    finally:
        ingress.draining = True
        await ingress.stop()
        await upstream.stop()
    return 0


async def _queue(args: argparse.Namespace, config: Config, state_dir: Path) -> int:
    state_dir_ready(state_dir)
    ks = KeyStore(state_dir)
    verifier = ks.verifier()
    node = QueueNode(_queue_config(config.queue, state_dir), verifier)
    await start_or_explain(node.start(), config.queue.listen)
    engine = await _start_workflows(config, node)
    metrics: asyncio.Server | None = None
    if config.queue.metrics:  # off unless configured: the node's own GET /metrics
        process = process_registry()

        def scrape() -> bytes:
            def write(out: Exposition) -> None:
                write_queue(out, node.registry.snapshot, node.signals, node.snapshot)
                if engine is not None:
                    engine.turn_stats.write(out)

            return render(process, write)

        try:
            metrics = await _listen_metrics(scrape, config.queue.metrics, verifier, config.metrics_key)
        except StartupError:
            await _stop_workflows(engine)
            await node.stop()
            raise
    log.info(
        "queue node %s listening on %s (region %s)", config.queue.node_id, config.queue.listen, config.queue.region
    )
    try:
        await _until_signalled()
    finally:
        if metrics is not None:
            metrics.close()
        await _stop_workflows(engine)
        await node.stop()
    return 0


async def _listen_metrics(
    scrape: Callable[[], bytes], address: str, verifier: Verifier | None, require_key: bool
) -> asyncio.Server:
    """`GET /metrics` of a queue node or a worker on `address`.

    Raises:
        StartupError: the address cannot be bound.
    """
    server = await start_or_explain(serve_metrics(scrape, address, verifier, require_key=require_key), address)
    log.info("metrics on http://%s/metrics", address)
    return server


def _die_with_parent() -> None:
    """A worker `casola up` started ends with it, however it ends (SIGKILL included): else it would
    redial a queue node that is gone, forever. Linux: PR_SET_PDEATHSIG; elsewhere nothing."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent thread exits
    if os.getppid() != int(parent):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


async def _worker(args: argparse.Namespace, config: Config, state_dir: Path) -> int:
    _die_with_parent()
    spec = config.workers[0] if config.workers else WorkerSpec()
    names = args.models.split(",") if args.models else spec.models
    try:
        if args.metrics:
            split_address(args.metrics)  # before the models load: that may take minutes
    except ValueError as exc:
        print(f"casola worker: --metrics: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        models = [_load_model(name, config) for name in names]
    except (ValueError, OSError) as exc:  # SpecError, a device or file problem: say which model
        print(f"casola worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    wc = WorkerConfig(
        queue=args.queue or [config.queue.listen],
        models=names,
        capacity=args.capacity or spec.capacity,
        pool=args.pool or spec.pool,
        node_id=args.node_id or "",
        threads=args.threads or spec.threads,
        region=config.queue.region,
    )
    try:
        credential = _worker_credential(args, state_dir)
    except OSError as exc:  # --credential-file (the state directory's: StartupError already)
        raise StartupError(f"worker key: {explain(exc, ())}") from exc
    runtime = WorkerRuntime(wc, models, credential)
    metrics = await _worker_metrics(runtime, args.metrics) if args.metrics else None
    await runtime.start()
    sig = await _until_signalled()
    if sig == signal.SIGTERM:
        log.info("%s draining (%d in flight)", runtime.node_id, runtime.active)
        await runtime.drain()
    else:
        await runtime.stop()
    if metrics is not None:
        metrics.close()
    return 0


async def _worker_metrics(runtime: WorkerRuntime, address: str) -> asyncio.Server:
    """`casola worker --metrics HOST:PORT`: the runtime's slots, busy slots, cancellations, health,
    and the process's figures. No key is asked for there (a worker has no verifier of its own):
    bind it to an address only the monitoring can reach.

    Raises:
        StartupError: the address cannot be bound.
    """
    process = process_registry()

    def scrape() -> bytes:
        return render(process, lambda out: write_worker(out, runtime))

    return await _listen_metrics(scrape, address, None, False)


def _load_model(name: str, config: Config) -> Model:
    """A built-in model, or one from the models directory (loaded now, once, before registering)."""
    if name in BUILTIN_MODELS:
        model: Model = BUILTIN_MODELS[name]()
        return model
    from workers.loader import build, resolve

    spec = resolve(name, config.models_dir, config.models)
    log.info("loading model %s (%s) from %s", name, spec.kind, spec.path or "-")
    return build(spec)


def _worker_credential(args: argparse.Namespace, state_dir: Path) -> str:
    if args.credential_file:
        return Path(args.credential_file).read_text().strip()
    if os.environ.get("CASOLA_WORKER_KEY"):
        return os.environ["CASOLA_WORKER_KEY"].strip()
    state_dir_ready(state_dir)
    return KeyStore(state_dir).ensure_key("worker-key", "_workers", [SCOPE_WORKER], "local workers")
