"""Per-sentence answers joined into one stream. WAV answers become one WAV: the first sentence's
header, its sizes set to "unknown" (0xFFFFFFFF, how a WAV of unknown length is streamed), then the
samples of every sentence; later sentences' headers are dropped (their format must match the
first's). Other content types are passed on as they are (PCM, or a codec whose frames concatenate).
"""

from __future__ import annotations

import struct

from casola.wire import Buffer

__all__ = ["WavFormatError", "WavJoin", "wav_header"]

_WAV_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
_UNKNOWN = struct.pack("<I", 0xFFFFFFFF)
_MAX_HEAD = 1 << 16  # a WAV header longer than this is not one our TTS engines write


class WavFormatError(ValueError):
    """A sentence's audio is not a WAV in the first sentence's format."""


class WavJoin:
    __slots__ = ("_fmt", "_head", "_n", "_reading")

    def __init__(self) -> None:
        self._n = 0  # the sentence being passed on
        self._reading = False  # its header is not complete yet
        self._head = bytearray()
        self._fmt: bytes | None = None

    def feed(self, n: int, chunk: Buffer, content_type: str) -> Buffer:
        """What to send on of sentence `n`'s next piece."""
        if content_type.partition(";")[0].strip().lower() not in _WAV_TYPES:
            return chunk
        if n != self._n:
            self._n, self._head, self._reading = n, bytearray(), True
        if not self._reading:
            return chunk
        self._head += chunk
        parsed = _parse(self._head)
        if parsed is None:
            if len(self._head) > _MAX_HEAD:
                raise WavFormatError(f"sentence {n}: no WAV data chunk in its first {_MAX_HEAD} bytes")
            return b""
        fmt, data_at = parsed
        head, rest = bytes(self._head[:data_at]), bytes(self._head[data_at:])
        self._reading, self._head = False, bytearray()
        if self._fmt is None:
            self._fmt = fmt
            return _streaming(head) + rest
        if fmt != self._fmt:
            raise WavFormatError(f"sentence {n}: its WAV format differs from the first sentence's")
        return rest


def _parse(buf: bytearray) -> tuple[bytes, int] | None:
    """(the fmt chunk's body, where the samples start), once the header is complete."""
    if len(buf) >= 4 and buf[:4] != b"RIFF":
        raise WavFormatError("the answer is not a RIFF WAV")
    pos, fmt = 12, b""
    while pos + 8 <= len(buf):
        cid, size = bytes(buf[pos : pos + 4]), struct.unpack_from("<I", buf, pos + 4)[0]
        if cid == b"data":
            return fmt, pos + 8
        if pos + 8 + size > len(buf):
            return None
        if cid == b"fmt ":
            fmt = bytes(buf[pos + 8 : pos + 8 + size])
        pos += 8 + size + (size & 1)
    return None


def _streaming(head: bytes) -> bytes:
    """The header with the RIFF and data sizes set to unknown."""
    return head[:4] + _UNKNOWN + head[8:-4] + _UNKNOWN


def wav_header(rate: int, channels: int, nbytes: int) -> bytes:
    """The 44-byte header of a PCM16 WAV file holding `nbytes` of samples."""
    block = 2 * channels
    return b"".join((
        b"RIFF", (36 + nbytes).to_bytes(4, "little"), b"WAVEfmt ", (16).to_bytes(4, "little"),
        (1).to_bytes(2, "little"), channels.to_bytes(2, "little"), rate.to_bytes(4, "little"),
        (rate * block).to_bytes(4, "little"), block.to_bytes(2, "little"), (16).to_bytes(2, "little"),
        b"data", nbytes.to_bytes(4, "little"),
    ))  # fmt: skip
