"""Metadata schemas, one msgspec Struct per frame type (SPEC §4).

Metadata is a msgpack array holding the fields below in order (`array_like`). Schema evolution is
append-only: a new field goes at the end and always has a default, so an older receiver ignores the
extra trailing elements and a newer receiver fills in defaults for elements an older sender did not
write. A metadata length of 0 means "every field at its default" and is only valid for types whose
fields all have defaults. Decoders are built once and reused.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

from casola.wire.errors import ErrorCode
from casola.wire.frames import PROTOCOL_VERSION, FrameType

__all__ = [
    "META_DECODERS",
    "META_DEFAULTS",
    "META_TYPES",
    "CancelMeta",
    "CheckpointMeta",
    "CreditMeta",
    "EndMeta",
    "ErrorMeta",
    "FilterPolicy",
    "GoAwayMeta",
    "HeartbeatMeta",
    "HelloAckMeta",
    "HelloMeta",
    "JobOp",
    "Meta",
    "Param",
    "RequestMeta",
    "ResponseMeta",
    "Role",
    "is_field_value",
]

U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Grant = Annotated[int, msgspec.Meta(ge=1, le=0x7FFF_FFFF)]
Role = Literal["client", "ingress", "queue", "worker"]
Pool = Literal["", "sync", "async", "shared"]
JobOp = Literal["", "submit", "status", "result", "cancel"]
FilterPolicy = Literal["", "off", "race", "block", "hold"]  # "": the caller's key sets none
Param = str | int | float | bool | None


_FIELD_VALUE: Final = re.compile(r"[\t\x20-\x7e]*")


def is_field_value(text: str) -> bool:
    """Whether `text` may be a content type or header value (SPEC §4.3): visible ASCII, space and
    tab only, so that it can become an HTTP header field unchanged (RFC 9110 §5.5) and never
    carries a CR or LF into one."""
    return _FIELD_VALUE.fullmatch(text) is not None


class Meta(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Base of all metadata structs."""


class HelloMeta(Meta, frozen=True):
    role: Role  # what the dialer claims to be; the credential must allow it
    min_version: U8 = PROTOCOL_VERSION
    max_version: U8 = PROTOCOL_VERSION
    credential: str = ""  # API key (client/ingress) or worker credential
    node_id: str = ""
    region: str = ""
    credit: U32 = 0  # streams the acceptor may open on this connection (SPEC §7)
    max_meta: U32 = 0  # the dialer's receive limits, so the acceptor can size frames (0: default)
    max_payload: U63 = 0
    models: list[str] = []  # worker: the models it serves
    pool: Pool = ""  # worker: capacity pool
    features: list[str] = []


class HelloAckMeta(Meta, frozen=True):
    version: U8  # the version chosen; every later frame's header carries it
    node_id: str = ""
    region: str = ""
    credit: U32 = 0  # streams the dialer may open
    max_meta: U32 = 0
    max_payload: U63 = 0
    features: list[str] = []


class GoAwayMeta(Meta, frozen=True):
    code: U16 = ErrorCode.NO_ERROR
    last_stream_id: U32 = 0  # highest peer-opened stream the sender processes
    message: str = ""
    retry_after_ms: U32 = 0


class CreditMeta(Meta, frozen=True):
    grant: Grant  # additional streams the receiver may open


class HeartbeatMeta(Meta, frozen=True):
    active: U32 = 0  # streams in progress
    capacity: U32 = 0  # slots in total
    healthy: bool = True
    load: float = 0.0  # 0..1, the sender's own measure (GPU utilisation, queue fill)
    stats: dict[str, float] = {}


class RequestMeta(Meta, frozen=True):
    model: str
    deadline_ms: U32 = 0  # budget from when the receiver got the frame; 0: none
    content_type: str = ""
    params: dict[str, Param] = {}  # model parameters
    trace: bool = False  # collect timings (Server-Timing)
    tenant: str = ""
    priority: Annotated[int, msgspec.Meta(ge=-128, le=127)] = 0
    job_id: str = ""  # async jobs: the persisted job
    fence: U63 = 0  # async jobs: the lease's fencing token
    attempt: U16 = 0  # 0 for the first dispatch, +1 per retry/redispatch
    resume_len: U63 = 0  # async redispatch: the body's first resume_len bytes are the last checkpoint
    op: JobOp = ""  # "": run now (sync, or a job's dispatch); else an async job operation (SPEC §3.8.1)
    idempotency_key: str = ""  # op "submit": a repeat with the same key returns the first job
    webhook_url: str = ""  # op "submit": POSTed to once the job completes
    filter: FilterPolicy = ""  # the API key's content-filter policy; "": the model's applies
    request_id: str = ""  # the request's id (X-Request-Id), for every log line about it, end to end
    traceparent: str = ""  # W3C Trace Context, carried to the handler unchanged ("": none)
    tracestate: str = ""


class ResponseMeta(Meta, frozen=True):
    content_type: str = ""
    headers: dict[str, str] = {}
    timing: dict[str, float] = {}  # stage -> milliseconds known when the head is sent


class EndMeta(Meta, frozen=True):
    timing: dict[str, float] = {}  # stage -> milliseconds, totals (e.g. "work")
    fence: U63 = 0
    trailers: dict[str, str] = {}


class ErrorMeta(Meta, frozen=True):
    code: U16
    message: str = ""
    retry_after_ms: U32 = 0
    param: str = ""  # which input was wrong, when one was
    timing: dict[str, float] = {}


class CancelMeta(Meta, frozen=True):
    code: U16 = ErrorCode.CANCELLED
    message: str = ""


class CheckpointMeta(Meta, frozen=True):
    seq: U32  # increases per checkpoint of a stream
    fence: U63 = 0
    progress: float = 0.0  # 0..1, informational


META_TYPES: Final[dict[FrameType, type[Meta]]] = {
    FrameType.HELLO: HelloMeta,
    FrameType.HELLO_ACK: HelloAckMeta,
    FrameType.GOAWAY: GoAwayMeta,
    FrameType.CREDIT: CreditMeta,
    FrameType.HEARTBEAT: HeartbeatMeta,
    FrameType.REQUEST: RequestMeta,
    FrameType.RESPONSE: ResponseMeta,
    FrameType.END: EndMeta,
    FrameType.ERROR: ErrorMeta,
    FrameType.CANCEL: CancelMeta,
    FrameType.CHECKPOINT: CheckpointMeta,
}

META_DECODERS: Final[dict[FrameType, msgspec.msgpack.Decoder[Meta]]] = {
    t: msgspec.msgpack.Decoder(cls) for t, cls in META_TYPES.items()
}


def _default(cls: type[Meta]) -> Meta | None:
    try:
        return cls()
    except TypeError:  # a required field: a zero metadata length is not valid for this type
        return None


# The instance a zero-length metadata decodes to; the encoder writes length 0 for exactly this
# object (identity, not equality), which keeps re-encoding byte-identical.
META_DEFAULTS: Final[dict[FrameType, Meta | None]] = {t: _default(c) for t, c in META_TYPES.items()}
