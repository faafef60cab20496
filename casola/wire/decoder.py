"""Bytes in, frames out: the sans-I/O frame decoder (SPEC §2, §3, §8).

Receive model (STYLE §3): one preallocated receive buffer per connection. The I/O layer asks
`writable()` where the next bytes should land (`recv_into` target), then calls `commit(n)`.
- A header is checked against the limits and the per-type rules the moment its 20 bytes are in,
  before anything else of the frame is waited for.
- A payload below `inline_max` is copied once out of the shared buffer (`bytes`).
- A payload of `inline_max` or more that has not fully arrived gets a buffer of its own: what is
  already here is copied into it, and from then on `writable()` is the unfilled tail of that buffer,
  so the rest lands in its final place. The frame carries `memoryview(buffer)`.
- The unparsed tail moves to the front of the shared buffer at most once per `commit()`.
- Metadata is checked as soon as it is all here, before the payload is waited for (SPEC §2.3), so
  bad metadata is `BAD_META` even if the stream then ends inside the payload; the decoded value is
  kept for the frame while the rest of a small payload arrives.

Before the handshake (SPEC §6.1) only the frames a side may then receive are accepted, checked at
the header like its lengths: anything else is `BAD_STATE` before a byte of its body is waited for,
so a peer that has not authenticated gets nothing allocated for it but a small first receive
buffer (`FIRST_RX`); the full one comes with the handshake.

After a `RemoteProtocolError` the decoder is dead: every later call raises the same error (a fresh
exception each time: a stored one would hold its traceback, and through it the decoder, in a
cycle that keeps a closed connection's buffers alive until the next full collection).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

import msgspec

from casola.wire.errors import ErrorCode, RemoteProtocolError
from casola.wire.events import Buffer, Frame
from casola.wire.frames import ANY, FRAME_RULES, HEAD, HEAD_SIZE, PROTOCOL_VERSION, FrameType
from casola.wire.limits import DEFAULT_LIMITS, MAX_META_DEPTH, Limits
from casola.wire.meta import META_DECODERS, META_DEFAULTS
from casola.wire.nesting import nests_too_deep

__all__ = ["FIRST_RX", "FrameDecoder", "copy_in"]

T = TypeVar("T")

_unpack_head: Final = HEAD.unpack_from
_EMPTY: Final = b""
_NO_META: Final = object()  # per-type marker: metadata not allowed / zero length not valid
_UNCHECKED: Final = object()  # no metadata checked yet for the partial frame at the buffer's front
# The receive buffer until the handshake: a HELLO with a credential and a model list is a few
# hundred bytes; a larger one (up to max_meta) grows it once to the full rx_buffer.
FIRST_RX: Final = 4096

# Per type byte (0..255): (FrameType, rule, meta decoder or None, default meta or _NO_META).
# A list indexed by the raw byte is the cheapest lookup on the hot path.
# The rule is stored as a plain tuple: unpacking a NamedTuple misses CPython's fast path (~30 ns/frame).
_TypeEntry = tuple[FrameType, tuple[bool, bool, int, int], Any, Any]
_BY_BYTE: Final[list[_TypeEntry | None]] = [None] * 256
for _t, _rule in FRAME_RULES.items():
    _default = META_DEFAULTS.get(_t)
    _plain = (_rule.on_stream, _rule.meta, _rule.payload, _rule.flags)
    _BY_BYTE[_t] = (_t, _plain, META_DECODERS.get(_t), _NO_META if _default is None else _default)


class FrameDecoder:
    """Incremental decoder of one direction of one connection."""

    __slots__ = (
        "_body",
        "_body_filled",
        "_body_frame",
        "_body_view",
        "_end",
        "_error",
        "_expect",
        "_inline_max",
        "_max_meta",
        "_max_payload",
        "_opens_on",
        "_pending_meta",
        "_pos",
        "_rx",
        "_rx_size",
        "_view",
        "version",
    )

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        version: int = PROTOCOL_VERSION,
        *,
        expect: frozenset[FrameType] | None = None,
        opens_on: FrameType | None = None,
    ) -> None:
        """Args:
        limits: the receive limits.
        version: the header version expected (the connection raises it after negotiation).
        expect: before the handshake, the only frame types accepted (None: any, no handshake
            phase); `handshake_done()` ends the phase.
        opens_on: decoding a frame of this type ends the phase too (a dialer's HELLO_ACK, which
            may share a read with the first stream frames).
        """
        self.version = version
        self._max_meta = limits.max_meta
        self._max_payload = limits.max_payload
        self._inline_max = limits.inline_max
        self._rx_size = limits.rx_buffer
        self._expect = expect
        self._opens_on = opens_on
        self._rx = bytearray(self._rx_size if expect is None else min(FIRST_RX, self._rx_size))
        self._view = memoryview(self._rx)  # replaced, never resized, so this export is safe to keep
        self._pos = 0  # first unparsed byte
        self._end = 0  # one past the last received byte
        self._body: bytearray | None = None  # large payload being received in place
        self._body_view: memoryview | None = None
        self._body_filled = 0
        self._body_frame: Frame | None = None
        self._pending_meta: Any = _UNCHECKED  # metadata of the frame at _pos, checked, payload still due
        self._error: RemoteProtocolError | None = None

    # -- receiving ---------------------------------------------------------------------------

    def writable(self) -> memoryview:
        """Where the next received bytes must be written; never empty."""
        if self._body_view is not None:
            return self._body_view[self._body_filled :]
        return self._view[self._end :]

    def commit(self, n: int) -> list[Frame]:
        """`n` bytes were written at the start of `writable()`.

        Returns:
            The frames completed by these bytes, in order.
        Raises:
            RemoteProtocolError: the bytes break the spec (also on every call after that). Its
                `events` holds the frames this call completed before the offending bytes.
        """
        if self._error is not None:
            raise _again(self._error)
        out: list[Frame] = []
        if self._body is not None:
            self._body_filled += n
            if self._body_filled < len(self._body):
                return out
            out.append(self._finish_body())
            return out
        self._end += n
        try:
            self._parse(out)
        except RemoteProtocolError as exc:
            exc.events = out  # frames completed before the bad bytes, so no feed loses any
            self._error = _again(exc)  # kept without the traceback (see the module docstring)
            raise
        return out

    def receive_data(self, data: Buffer) -> list[Frame]:
        """Copy `data` through `writable()`/`commit()`; `b""` means EOF (see `eof()`).

        Raises:
            RemoteProtocolError: as `commit()`, or TRUNCATED at EOF inside a frame.
        """
        if not data:
            self.eof()
            return []
        return copy_in(data, self.writable, self.commit)

    def eof(self) -> None:
        """The peer closed its sending side.

        Raises:
            RemoteProtocolError: TRUNCATED if a frame was only partly received.
        """
        if self._error is not None:
            raise _again(self._error)
        if self._body is not None or self._end > self._pos:
            self._error = RemoteProtocolError(ErrorCode.TRUNCATED, "connection ended inside a frame")
            raise _again(self._error)

    def handshake_done(self) -> None:
        """The handshake is complete: every frame type may arrive, into the full receive buffer."""
        self._expect = None
        if len(self._rx) < self._rx_size:
            self._grow()

    def _grow(self) -> None:
        """Move what is buffered into a receive buffer of the full size (once per connection)."""
        tail = self._end - self._pos
        rx = bytearray(self._rx_size)
        rx[:tail] = self._view[self._pos : self._end]
        self._rx, self._view, self._pos, self._end = rx, memoryview(rx), 0, tail

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as frames."""
        return self._end - self._pos + self._body_filled

    # -- parsing -----------------------------------------------------------------------------

    def _parse(self, out: list[Frame]) -> None:
        rx, view, pos, end = self._rx, self._view, self._pos, self._end
        handshake = self._expect is not None  # the phase of the small first buffer
        checked, self._pending_meta = self._pending_meta, _UNCHECKED  # belongs to the first frame only
        while end - pos >= HEAD_SIZE:
            version, tbyte, flags, sid, mlen, blen = _unpack_head(rx, pos)
            ftype, meta_decoder, default = self._check_head(version, tbyte, flags, sid, mlen, blen)
            if handshake and HEAD_SIZE + mlen > len(rx) < self._rx_size:
                self._pos = pos  # a large HELLO: the first buffer grows, once, to the full size
                self._grow()
                rx, view, pos, end = self._rx, self._view, self._pos, self._end
            mstart = pos + HEAD_SIZE
            bstart = mstart + mlen
            if bstart > end:
                break  # metadata incomplete: wait, cursor untouched
            if blen >= self._inline_max and bstart + blen > end:
                meta = _decode_meta(ftype, meta_decoder, default, view[mstart:bstart])
                self._start_body(Frame(ftype, sid, meta, _EMPTY, flags), blen, view[bstart:end])
                self._pos = self._end = 0
                return
            if checked is not _UNCHECKED:  # this frame's metadata, checked by an earlier commit
                meta, checked = checked, _UNCHECKED
            elif meta_decoder is None:
                meta = None
            elif mlen:
                meta = _decode_meta(ftype, meta_decoder, default, view[mstart:bstart])
            elif default is _NO_META:
                raise RemoteProtocolError(ErrorCode.BAD_META, f"{ftype.name} metadata has required fields")
            else:
                meta = default
            if bstart + blen > end:
                self._pending_meta = meta  # checked now (SPEC §2.3); the payload is still to come
                break
            payload = bytes(view[bstart : bstart + blen]) if blen else _EMPTY
            out.append(Frame(ftype, sid, meta, payload, flags))
            pos = bstart + blen
            if handshake and ftype is self._opens_on:  # the handshake is over: streams may follow
                self._pos, handshake = pos, False
                self.handshake_done()
                rx, view, pos, end = self._rx, self._view, self._pos, self._end
        self._compact(pos, end)

    def _check_head(
        self, version: int, tbyte: int, flags: int, sid: int, mlen: int, blen: int
    ) -> tuple[FrameType, Any, Any]:
        """SPEC §2.3, in this order: version, type, flags, stream id class, lengths."""
        if version != self.version:
            raise RemoteProtocolError(ErrorCode.BAD_VERSION, f"version {version}, expected {self.version}")
        entry = _BY_BYTE[tbyte]
        if entry is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_FRAME_TYPE, f"frame type 0x{tbyte:02x}")
        ftype, (on_stream, meta_ok, payload_rule, flags_ok), meta_decoder, default = entry
        if flags & ~flags_ok:
            raise RemoteProtocolError(ErrorCode.BAD_FLAGS, f"{ftype.name} flags 0x{flags:04x}")
        if on_stream != (sid != 0):
            where = "a stream id" if on_stream else "stream id 0"
            raise RemoteProtocolError(ErrorCode.BAD_STREAM_ID, f"{ftype.name} needs {where}, got {sid}")
        if mlen > self._max_meta or (mlen and not meta_ok):
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE, f"{ftype.name} metadata length {mlen}")
        if blen > self._max_payload or (payload_rule != ANY and blen != payload_rule):
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE, f"{ftype.name} payload length {blen}")
        if self._expect is not None and ftype not in self._expect:  # SPEC §2.3 check 7
            raise RemoteProtocolError(ErrorCode.BAD_STATE, f"{ftype.name} before the handshake completed")
        return ftype, meta_decoder, default

    def _compact(self, pos: int, end: int) -> None:
        if pos == end:
            self._pos = self._end = 0
            return
        tail = end - pos
        if pos:  # move the partial frame to the front, once per commit
            src = self._view[pos:end]
            self._rx[:tail] = src if tail <= pos else bytes(src)  # overlapping ranges need a copy
        self._pos, self._end = 0, tail

    # -- large payloads received in place ---------------------------------------------------

    def _start_body(self, frame: Frame, size: int, have: memoryview) -> None:
        # bytearray zero-fills (~7 us/MiB, a third of a copy); an uninitialised writable buffer
        # would need numpy or mmap in the core. Payloads are never copied after this point.
        body = bytearray(size)
        body[: len(have)] = have
        self._body, self._body_view, self._body_filled = body, memoryview(body), len(have)
        self._body_frame = frame

    def _finish_body(self) -> Frame:
        frame, view = self._body_frame, self._body_view
        assert frame is not None and view is not None
        frame.payload = view
        self._body = self._body_view = self._body_frame = None
        self._body_filled = 0
        return frame


def copy_in(data: Buffer, writable: Callable[[], memoryview], commit: Callable[[int], list[T]]) -> list[T]:
    """Feed `data` through a `writable()`/`commit(n)` pair, as a socket's recv_into would.

    Raises:
        RemoteProtocolError: from `commit`; its `events` then also holds what earlier commits of
            this call returned, so no caller loses an event.
    """
    src = memoryview(data).cast("B")
    out: list[T] = []
    while src:
        dst = writable()
        n = min(len(dst), len(src))
        dst[:n] = src[:n]
        src = src[n:]
        try:
            out += commit(n)
        except RemoteProtocolError as exc:
            exc.events = out + exc.events
            raise
    return out


def _again(err: RemoteProtocolError) -> RemoteProtocolError:
    """A fresh copy of `err` to raise: never the stored one, which then stays free of a traceback."""
    return RemoteProtocolError(err.code, err.message, err.stream_id)


def _decode_meta(ftype: FrameType, decoder: Any, default: Any, raw: memoryview) -> Any:
    if decoder is None:
        return None
    if not raw:
        if default is _NO_META:
            raise RemoteProtocolError(ErrorCode.BAD_META, f"{ftype.name} metadata has required fields")
        return default
    try:
        meta = decoder.decode(raw)
    # ValidationError; UnicodeDecodeError (bad UTF-8); RecursionError (an ignored element nested
    # past the interpreter's stack: past MAX_META_DEPTH too, SPEC §4.2)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(ErrorCode.BAD_META, f"{ftype.name} metadata: {exc}") from exc
    if nests_too_deep(raw, len(meta.__struct_fields__)):
        raise RemoteProtocolError(ErrorCode.BAD_META, f"{ftype.name} metadata nests deeper than {MAX_META_DEPTH}")
    return meta
