"""How a realtime session's messages travel on its one stream (docs/realtime.md, "Messages"): each
WebSocket message is a tag byte, its length (u32, big-endian) and its bytes unchanged.

The length makes the messages independent of DATA frame boundaries, which a node forwarding the
stream may move (SPEC §8, *Splitting bodies*: frames are not preserved across hops, bytes are). A
message that came in one frame, as the reference sends them, is returned as a view of it, uncopied.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgspec

from casola.wire import Buffer

__all__ = [
    "CONTENT_TYPE",
    "HEADER",
    "MAX_MESSAGE",
    "TAG_BINARY",
    "TAG_TEXT",
    "FramingError",
    "MessageReader",
    "json_message",
    "message",
]

# The REQUEST's content type: its DATA payloads are tagged messages, not one body.
CONTENT_TYPE: Final = "application/x-casola-realtime"
TAG_TEXT: Final = 0x01  # UTF-8 JSON, a control event
TAG_BINARY: Final = 0x02  # raw bytes: audio
HEADER: Final = 5  # tag, u32 length
MAX_MESSAGE: Final = 16 * 1024 * 1024  # the readers' default: the wire's default max_payload
_HEAD: Final = struct.Struct("!BI")
_TAGS: Final = (TAG_TEXT, TAG_BINARY)


class FramingError(Exception):
    """The stream's bytes are not tagged messages (a bad tag, or a message over the reader's limit)."""


def message(tag: int, data: Buffer) -> bytes:
    """One message as it goes into a DATA payload (the header and the bytes: one copy, one frame)."""
    return _HEAD.pack(tag, len(data)) + data


def json_message(encoder: msgspec.json.Encoder, obj: Any) -> bytearray:
    """A text message of `obj` as JSON, encoded in place after its header (no second copy)."""
    buf = bytearray(HEADER)
    encoder.encode_into(obj, buf, HEADER)
    _HEAD.pack_into(buf, 0, TAG_TEXT, len(buf) - HEADER)
    return buf


class MessageReader:
    """Splits a stream's DATA payloads back into messages, wherever the frames were cut."""

    __slots__ = ("_need", "_partial", "max_message")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._partial = bytearray()  # a message (or header) begun in an earlier payload
        self._need = 0  # its whole length, header included, once the header is in; 0: unknown

    def feed(self, payload: Buffer) -> list[tuple[int, memoryview]]:
        """The messages `payload` completes, as (tag, bytes).

        Raises:
            FramingError: what came is not tagged messages; the stream cannot be read further.
        """
        view = memoryview(payload)
        out: list[tuple[int, memoryview]] = []
        while len(view):
            if not self._partial and len(view) >= HEADER:
                size = HEADER + self._length(view)
                if len(view) >= size:  # whole: a view of the payload, no copy
                    out.append((view[0], view[HEADER:size]))
                    view = view[size:]
                    continue
            view = self._buffer(view, out)
        return out

    def _buffer(self, view: memoryview, out: list[tuple[int, memoryview]]) -> memoryview:
        """Take what `view` adds to the message begun earlier; the rest of `view`."""
        if not self._need:
            take = min(HEADER - len(self._partial), len(view))
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) < HEADER:
                return view
            self._need = HEADER + self._length(memoryview(self._partial))
        take = min(self._need - len(self._partial), len(view))
        self._partial += view[:take]
        if len(self._partial) == self._need:
            whole = memoryview(self._partial)  # handed out whole: the next message gets a new buffer
            out.append((whole[0], whole[HEADER:]))
            self._partial, self._need = bytearray(), 0
        return view[take:]

    def _length(self, head: memoryview) -> int:
        tag, length = _HEAD.unpack_from(head)
        if tag not in _TAGS:
            raise FramingError(f"a message without a valid tag byte (0x01 text, 0x02 binary; got {tag:#04x})")
        if length > self.max_message:
            raise FramingError(f"a message of {length} bytes, over the limit of {self.max_message}")
        return int(length)

    @property
    def pending(self) -> int:
        """Bytes of a message begun and not yet complete (0 at a message boundary)."""
        return len(self._partial)
