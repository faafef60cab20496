"""What the core hands its user: decoded frames and a few events the core makes itself (SPEC §5, §6).

A `Frame` is one frame, decoded: roles dispatch on `frame.type`. The other events do not exist on the
wire: they report what the connection decided (a stream it reset, an RTT it measured, its own end).
"""

from __future__ import annotations

import msgspec

from casola.wire.frames import FLAG_END, FrameType
from casola.wire.meta import Meta

__all__ = ["Buffer", "ConnectionTerminated", "Event", "Frame", "PingAcked", "StreamReset"]

Buffer = bytes | bytearray | memoryview  # byte-formatted, C-contiguous


class Frame(msgspec.Struct, gc=False):
    """One frame. `payload` is bytes when it was copied out of the receive buffer, or a memoryview
    of a buffer of its own (large payloads); either way the receiver owns it."""

    type: FrameType
    stream_id: int = 0
    meta: Meta | None = None
    payload: Buffer = b""
    flags: int = 0

    @property
    def end(self) -> bool:
        """True when the frame also ends its direction of the stream (FLAG_END, or an END frame)."""
        return bool(self.flags & FLAG_END) or self.type is FrameType.END


class StreamReset(msgspec.Struct, gc=False):
    """The core ended a stream on its own (a stream error, SPEC §9; or GOAWAY left it unprocessed).
    The matching CANCEL or ERROR to the peer is already queued when `remote` is False."""

    stream_id: int
    code: int
    message: str = ""
    remote: bool = False


class PingAcked(msgspec.Struct, gc=False):
    """A PONG answered our outstanding PING; `rtt` in seconds."""

    rtt: float


class ConnectionTerminated(msgspec.Struct, gc=False):
    """The connection is over: GOAWAY with an error, EOF, or a timeout. `remote` says who ended it."""

    code: int
    message: str = ""
    remote: bool = True


Event = Frame | StreamReset | PingAcked | ConnectionTerminated
