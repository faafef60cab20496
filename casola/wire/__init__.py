"""casola's wire protocol, sans-I/O (SPEC.md): frames, metadata, codec and connection state machines.

Nothing here touches sockets, event loops or clocks: callers pass bytes and `now` in and take events
and buffers out. Standard library and msgspec only.
"""

from casola.wire.connection import Connection
from casola.wire.decoder import FrameDecoder
from casola.wire.encoder import encode_frame
from casola.wire.errors import (
    ERROR_INFO,
    CasolaError,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Scope,
    error_info,
    error_name,
)
from casola.wire.events import Buffer, ConnectionTerminated, Event, Frame, PingAcked, StreamReset
from casola.wire.frames import FLAG_END, HEAD, HEAD_SIZE, PROTOCOL_VERSION, FrameType
from casola.wire.lifecycle import ConnState, Side
from casola.wire.limits import DEFAULT_LIMITS, Limits
from casola.wire.meta import (
    CancelMeta,
    CheckpointMeta,
    CreditMeta,
    EndMeta,
    ErrorMeta,
    GoAwayMeta,
    HeartbeatMeta,
    HelloAckMeta,
    HelloMeta,
    Meta,
    RequestMeta,
    ResponseMeta,
)
from casola.wire.stream import StreamState

__all__ = [
    "DEFAULT_LIMITS",
    "ERROR_INFO",
    "FLAG_END",
    "HEAD",
    "HEAD_SIZE",
    "PROTOCOL_VERSION",
    "Buffer",
    "CancelMeta",
    "CasolaError",
    "CheckpointMeta",
    "ConnState",
    "Connection",
    "ConnectionTerminated",
    "CreditMeta",
    "EndMeta",
    "ErrorCode",
    "ErrorMeta",
    "Event",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "GoAwayMeta",
    "HeartbeatMeta",
    "HelloAckMeta",
    "HelloMeta",
    "Limits",
    "LocalProtocolError",
    "Meta",
    "PingAcked",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestMeta",
    "ResponseMeta",
    "Scope",
    "Side",
    "StreamReset",
    "StreamState",
    "encode_frame",
    "error_info",
    "error_name",
]
