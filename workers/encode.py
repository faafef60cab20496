"""Stream TTS output (PCM16) to the client in the format it asked for, chunk by chunk.

The formats are OpenAI's audio/speech `response_format`s. wav and pcm are written here; mp3,
opus (in Ogg), flac and aac (ADTS) go through PyAV muxing into an in-memory sink that is not
seekable, so every muxer writes in order and each `feed` hands back what is ready so far.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Any, Final

import numpy as np

from workers.audio import wav_header

__all__ = ["CONTENT_TYPES", "FORMATS", "EncodeError", "StreamEncoder"]

FORMATS: Final = ("wav", "pcm", "mp3", "opus", "flac", "aac")
CONTENT_TYPES: Final = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "aac": "audio/aac",
}
# OpenAI's raw pcm is 24 kHz s16le; Opus only runs at 48/24/16/12/8 kHz and players expect 48.
_FIXED_RATE: Final = {"pcm": 24000, "opus": 48000}
# format -> (container, encoder, muxer options). Ogg buffers a page per second by default, which
# would hold a whole sentence back; 100 ms pages keep it streaming.
_AV_FORMATS: Final = {
    "mp3": ("mp3", "libmp3lame", {}),
    "opus": ("ogg", "libopus", {"page_duration": "100000"}),
    "flac": ("flac", "flac", {}),
    "aac": ("adts", "aac", {}),
}
# Small I/O buffer plus flush_packets so bytes leave ffmpeg per packet instead of per 32 KiB.
_AV_BUFFER: Final = 4096
# ffmpeg's default layout per channel count; TTS voices are mono, and codecs stop at 7.1.
_LAYOUTS: Final = ("mono", "stereo", "2.1", "quad", "5.0", "5.1", "6.1", "7.1")


class EncodeError(ValueError):
    """An encoder that cannot be built (unknown format, bad rate) or that failed mid-stream."""


@contextmanager
def _codec_errors(fmt: str) -> Iterator[None]:
    """Translate PyAV's errors (FFmpegError, or ValueError for bad parameters) into EncodeError."""
    import av

    try:
        yield
    except (av.error.FFmpegError, ValueError) as exc:
        raise EncodeError(f"{fmt} encoder failed: {exc}") from exc


class _Sink:
    """Write-only, non-seekable file for PyAV: having no seek() makes muxers stream in order
    (FLAC then leaves STREAMINFO's length at 0, which decoders read as unknown)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class _AvWriter:
    """One PyAV output container encoding int16 frames at the codec's rate."""

    def __init__(self, fmt: str, rate: int, channels: int) -> None:
        import av  # deferred: ffmpeg's libraries load only when a compressed format is asked for

        container, codec, options = _AV_FORMATS[fmt]
        self._sink = _Sink()
        self._layout = _LAYOUTS[channels - 1]
        self._rate = rate
        self._pts = 0
        self._out = av.open(
            self._sink, mode="w", format=container, buffer_size=_AV_BUFFER, options={"flush_packets": "1", **options}
        )
        self._stream: Any = self._out.add_stream(codec, rate=rate, layout=self._layout)
        # Open the codec and write the container header now: an empty stream is then still a
        # valid file, and the client gets the header with the first chunk.
        self._out.start_encoding()

    def write(self, samples: np.ndarray) -> bytes:
        import av

        if len(samples):
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=self._layout)
            frame.sample_rate, frame.pts, frame.time_base = self._rate, self._pts, Fraction(1, self._rate)
            self._pts += len(samples)
            # PyAV converts to the codec's sample format and frame size on the way in.
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        for packet in self._stream.encode(None):
            self._out.mux(packet)
        self._out.close()
        return self._sink.take()


def _codec_rate(fmt: str, rate: int) -> int:
    """Keep `rate` where the codec allows it (mp3 and aac have lists), else the next higher allowed
    rate, so no bandwidth is lost, or the highest one."""
    if fmt in _FIXED_RATE:
        return _FIXED_RATE[fmt]
    if fmt in ("mp3", "aac"):
        import av

        allowed = av.codec.Codec(_AV_FORMATS[fmt][1], "w").audio_rates or (rate,)
        return min((r for r in allowed if r >= rate), default=max(allowed))
    return rate


class StreamEncoder:
    """PCM16 in (mono or interleaved, at `rate`), encoded bytes out as soon as the codec has them.

    `feed` accepts chunks of any length (a sample split across two chunks is carried over);
    the concatenation of everything `feed` and `finish` return is one valid file.
    """

    def __init__(self, fmt: str, rate: int, channels: int = 1) -> None:
        """Build the encoder; for container formats the header is ready with the first `feed`.

        Raises:
            EncodeError: unknown format, non-positive rate or unsupported channel count.
        """
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            raise EncodeError(f"unknown audio format {fmt!r}: expected one of {', '.join(FORMATS)}")
        if rate <= 0 or not 1 <= channels <= len(_LAYOUTS):
            raise EncodeError(f"cannot encode {channels} channel(s) at {rate} Hz")
        self.fmt = fmt
        self.rate = rate
        self.channels = channels
        self.content_type: str = CONTENT_TYPES[fmt]
        self.out_rate: int = _codec_rate(fmt, rate)
        self._carry = b""
        self._done = False
        self._resampler: Any = None
        if self.out_rate != rate:
            import soxr

            # A streaming resampler keeps filter state across chunks, so chunk edges do not click.
            self._resampler = soxr.ResampleStream(rate, self.out_rate, channels, dtype="int16", quality="HQ")
        self._writer: _AvWriter | None = None
        self._header = b""
        if fmt in _AV_FORMATS:
            with _codec_errors(fmt):
                self._writer = _AvWriter(fmt, self.out_rate, channels)
        elif fmt == "wav":
            self._header = wav_header(self.out_rate, channels)  # 0xFFFFFFFF sizes: length unknown

    def feed(self, pcm16: bytes | bytearray | memoryview) -> bytes:
        """Encode one chunk of little-endian PCM16.

        Returns:
            the output bytes ready now; may be b"" while the codec fills a frame.

        Raises:
            EncodeError: after finish(), or when the codec fails.
        """
        if self._done:
            raise EncodeError("feed() after finish()")
        data = self._carry + bytes(pcm16)
        whole = len(data) - len(data) % (2 * self.channels)
        self._carry = data[whole:]
        samples = np.frombuffer(data, "<i2", count=whole // 2).reshape(-1, self.channels)
        if self._resampler is not None and len(samples):
            samples = self._resampler.resample_chunk(samples, last=False)
        return self._encode(samples)

    def finish(self) -> bytes:
        """Flush the resampler and codec and close the file (a trailing half sample is dropped).

        Raises:
            EncodeError: called twice, or the codec fails while flushing.
        """
        if self._done:
            raise EncodeError("finish() called twice")
        self._done = True
        tail = np.zeros((0, self.channels), np.int16)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(tail, last=True)
        out = self._encode(tail)
        if self._writer is not None:
            with _codec_errors(self.fmt):
                out += self._writer.close()
        return out

    def _encode(self, samples: np.ndarray) -> bytes:
        samples = np.ascontiguousarray(samples, dtype="<i2").reshape(-1, self.channels)
        if self._writer is None:
            head, self._header = self._header, b""
            return head + samples.tobytes()
        with _codec_errors(self.fmt):
            return self._writer.write(samples)
