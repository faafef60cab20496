"""The TOML configuration of every role (`casola up --config casola.toml`).

Every section and key is optional; what is left out takes the default shown. An unknown key is an
error (a typo must not silently fall back to a default). Example, with the defaults:

```toml
state_dir = ".casola"            # signing key, API keys, revocation list (--state-dir wins)
log_level = "info"               # debug | info | warning | error | critical (--log-level wins)
log_format = "text"              # text | json: one JSON object a line, with the request id (--log-format wins)
access_log = false               # one line per request at the ingress, logger casola.access (--access-log)
metrics_key = false              # GET /metrics (ingress, [queue] metrics) needs a key with the `metrics` scope
models_dir = "models"            # model directories <models_dir>/<name>/ with casola.json (`casola models`)

[ingress]
http = "127.0.0.1:8000"          # HTTP/1.1 listener
frames = "127.0.0.1:7700"        # raw-frame listener ("" = off)
trace = false                    # Server-Timing on every response (else per request: X-Casola-Trace: 1)
timing_allow_origin = ""         # e.g. "*" so browsers may read Server-Timing
cors_origins = []                # origins whose pages may call the API, e.g. ["https://app.example"] or ["*"]
backlog = 2048                   # listen queue of both listeners (connections not yet accepted)
max_inflight = 4096              # requests in progress; beyond, 429 at once (to tenants over their fair share)
max_inflight_per_tenant = 1024   # of those, one tenant's; a key may carry a lower limit (keys create --max-inflight)
default_deadline_ms = 0          # 0 = none
max_body = 67108864              # bytes; larger bodies get 413
max_head = 16384                 # request line + headers; larger -> 431
max_headers = 100
idle_timeout = 30.0              # keep-alive connections idle this long are closed
head_timeout = 10.0              # a request head must arrive within this (slow clients) -> 408
body_timeout = 30.0              # a body stalled this long -> 408
send_timeout = 30.0              # a client that takes no answer bytes this long is aborted
tls_cert = ""                    # PEM chain, leaf first; with tls_key the HTTP listener speaks HTTPS
tls_key = ""                     # its private key; both "" = plain HTTP (dev pair: `casola certs dev`)
openai_aliases = {}              # /openai/v1 model names to served ones, e.g. { "whisper-1" = "asr" }
ws_max_message = 1048576         # WebSocket (/v1/realtime): largest message; more closes it (1009)
ws_ping_interval = 20.0          # seconds between pings (0 = none); no pong within ws_ping_timeout closes it
ws_ping_timeout = 20.0
ws_max_unread = 8388608          # bytes of messages a client leaves unread before it is dropped
ws_max_sessions_per_tenant = 16  # realtime sessions one tenant may hold open (each holds a worker slot)
realtime_token_ttl = 60           # seconds a POST /v1/realtime/sessions token is valid (it opens one socket)
# `casola ingress` (separate process) names its queue nodes; `casola up` uses its own.
# [[ingress.queue_nodes]]
# address = "127.0.0.1:7710"
# region = "eu-west"

[queue]
listen = "127.0.0.1:7710"        # frames, for ingresses and workers
region = "local"
node_id = "queue-1"
max_pending = 1024               # sync requests waiting for a slot, per model; beyond, 429
max_pending_per_tenant = 256     # of those, one tenant's (one tenant's flood cannot fill the line)
retry_after_ms = 1000            # Retry-After until a service time is measured (then: from the drain rate)
deadlines = {}                   # per model, e.g. { tts = 800 }: deadline (ms) of sync requests naming none
sync_wait_ms = 10000             # longest wait for a slot, deadline or not (429 at once if longer); 0 = none
lend_idle_sync = false           # async jobs may use free slots of sync-pool workers...
lend_reserve = 1                 # ...all but this many per worker, kept free for sync arrivals
models = []                      # models known before a worker registers (others: 404 until one does)
worker_ping_timeout = 5.0        # a worker silent this long is considered dead
outbound_allow = []              # CIDRs webhooks may reach though not public, e.g. ["10.1.0.0/16", "::1/128"]
metrics = ""                     # `casola queue` alone: GET /metrics on host:port, e.g. "127.0.0.1:9110" ("" = off)

[queue.jobs]                     # async jobs (persisted, leased, redispatched from checkpoints)
store = ""                       # "" = sqlite:///<state_dir>/jobs.db; or postgresql://user@host:5432/db[?schema=s]
lease_s = 30.0                   # a worker that sends nothing (no HEARTBEAT/CHECKPOINT) this long loses its job
max_attempts = 3                 # dispatches per job; then it completes with error_type "worker_error"
retention_s = 604800.0           # completed jobs (and results) are deleted after this
sweep_interval = 1.0             # expired leases, due webhooks, jobs submitted through other nodes
max_input = 67108864             # bytes of one job's input
max_result = 67108864            # bytes of one job's result
max_wait_ms = 30000              # longest long poll (status/result ?wait_ms=)
webhook_key = ""                 # Ed25519 key signing webhooks; "" = <state_dir>/webhook-key.pem
webhook_attempts = 8             # deliveries tried per webhook (backoff with jitter, Retry-After honoured)

[queue.filter]                   # content filtering, racing dispatch (docs/filtering.md)
policy = "race"                  # every model's: off | race | block (classify before dispatch)
models = {}                      # per model, e.g. { image-gen = "block" }; "block" also overrides a key's policy
classifiers = ["rules"]          # "rules" and/or "model"; a violation from any one counts
terms = []                       # rules: literal terms, case-insensitive (none and no patterns: rules off)
patterns = []                    # rules: RE2 regular expressions (linear time)
classify_model = "classify"      # model: the worker model asked for a verdict
timeout_ms = 2000                # a classification that takes longer counts as failed
on_error = "allow"               # allow | block: what a failed classification means
max_input = 16777216             # bytes; larger inputs are not classified (block: 413)
audit_clean = false              # also store audit records of clean verdicts (violations always)

[[workers]]                      # local worker processes started by `casola up`
models = ["echo"]                # built in (echo, steps), directories in models_dir or [models.*] (`casola up` checks)
count = 1                        # processes
capacity = 64                    # requests each runs at once
pool = "shared"                  # sync | async | shared (shared: both, sync first)
threads = 4                      # thread pool for blocking handlers

# Workflows (docs/workflows.md): pipelines of steps run inside the queue node, e.g.
# [workflows.voice-agent]
# deadline_ms = 15000            # the whole run's, when the request names none (0 = none)
# max_concurrent = 64            # runs at once
# steps = [{ name = "asr", kind = "model", model = "asr" }, ...]

# Per model, optional: what its directory's casola.json says, overridden (docs/models.md).
# [models.chat]
# kind = "llm"                   # whisper | llm | tts | classify | tools
# path = ""                      # "" = <models_dir>/chat
# device = "auto"                # auto (CUDA when CTranslate2 sees a GPU) | cpu | cuda
# compute_type = "auto"          # auto: int8_float16 on CUDA, int8 on CPU; or any CTranslate2 type
# threads = 0                    # CTranslate2 intra_threads on CPU (0: its default)
# options = {}                   # merged over the manifest's options
```
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any, Final

import msgspec

from casola.flow.spec import WorkflowConfig, WorkflowError, check_workflows
from casola.ingress.server import IngressConfig
from casola.logs import LOG_FORMATS, LOG_LEVELS
from casola.queue.node import QueueConfig

__all__ = ["WORKER_POOLS", "Config", "ConfigError", "ModelConfig", "WorkerSpec", "check_worker_models", "load_config"]

WORKER_POOLS: Final = ("sync", "async", "shared")  # what `[[workers]] pool` may be (docs/scheduling.md)


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[models.<name>]`: overrides of what `<models_dir>/<name>/casola.json` says."""

    kind: str = ""
    path: str = ""
    device: str = "auto"
    compute_type: str = "auto"
    threads: int = 0
    options: dict[str, Any] = {}


class WorkerSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    models: list[str] = msgspec.field(default_factory=lambda: ["echo"])
    count: int = 1
    capacity: int = 64
    pool: str = "shared"
    threads: int = 4


def _default_workers() -> list[WorkerSpec]:
    return [WorkerSpec()]


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    state_dir: str = ".casola"
    log_level: str = "info"
    log_format: str = "text"
    access_log: bool = False
    metrics_key: bool = False
    models_dir: str = "models"
    ingress: IngressConfig = msgspec.field(default_factory=IngressConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    workers: list[WorkerSpec] = msgspec.field(default_factory=_default_workers)
    models: dict[str, ModelConfig] = {}
    workflows: dict[str, WorkflowConfig] = {}  # docs/workflows.md

    def __post_init__(self) -> None:
        # Checked at load, naming the key (msgspec reports a ValueError as a ValidationError): the
        # logging set-up would otherwise fail with a traceback.
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format {self.log_format!r} is not one of {', '.join(LOG_FORMATS)}")


class ConfigError(ValueError):
    """The configuration file cannot be read or does not match the schema."""


def load_config(path: str | Path | None) -> Config:
    """The configuration in `path`, or every default when `path` is None.

    Raises:
        ConfigError: unreadable file, invalid TOML, unknown key, wrong type or a value out of range
            (the message says where).
    """
    if path is None:
        return Config()
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    for i, spec in enumerate(config.workers, 1):
        if problem := _worker_problem(spec):
            raise ConfigError(f"{path}: [[workers]] #{i}: {problem}")
    served = {*config.queue.models, *(m for spec in config.workers for m in spec.models), *config.models}
    try:
        check_workflows(config.workflows, served)
    except WorkflowError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _worker_problem(spec: WorkerSpec) -> str:
    """What is wrong with one `[[workers]]` entry, or "" (checked at load: `casola up` would
    otherwise restart a worker that cannot start)."""
    if spec.pool not in WORKER_POOLS:
        return f"pool {spec.pool!r} is not one of {', '.join(WORKER_POOLS)}"
    for key in ("count", "capacity", "threads"):
        if (value := getattr(spec, key)) < 1:
            return f"{key} must be at least 1, not {value}"
    if not spec.models:
        return "models must name at least one model"
    return ""


def check_worker_models(config: Config, builtin: Collection[str]) -> None:
    """Check that every model a `[[workers]]` entry names can be found, without loading any: built
    in, a model directory `<models_dir>/<name>/` with a valid casola.json, or `[models.<name>]`.

    Called by the roles that start workers, not at load: the models directory may be prepared after
    the config is written, and commands such as `casola keys` do not serve models.

    Raises:
        ConfigError: naming the entry, the model and the models that are available.
    """
    for i, spec in enumerate(config.workers, 1):
        for name in spec.models:
            if name not in builtin and (problem := _model_problem(name, config)):
                known = ", ".join(_available(config, builtin)) or "none"
                raise ConfigError(f"[[workers]] #{i}: model {name!r} {problem}; available: {known}")


def _model_problem(name: str, config: Config) -> str:
    """Why `casola worker` could not resolve model `name`, or "" (reads one small manifest at most)."""
    from workers.loader import resolve  # late: only the roles that start workers need it
    from workers.spec import MANIFEST, SpecError

    manifest = Path(config.models_dir) / name / MANIFEST
    if name not in config.models and not manifest.is_file():
        return f"is not built in, has no {manifest} and no [models.{name}] table"
    try:
        resolve(name, config.models_dir, config.models)
    except SpecError as exc:
        return f"cannot be resolved: {exc}"
    return ""


def _available(config: Config, builtin: Collection[str]) -> list[str]:
    """Model names a worker could serve: built in, model directories, `[models.*]` tables."""
    from workers.spec import MANIFEST

    root = Path(config.models_dir)
    found = sorted(d.name for d in root.iterdir() if (d / MANIFEST).is_file()) if root.is_dir() else []
    return list(dict.fromkeys([*builtin, *found, *config.models]))
