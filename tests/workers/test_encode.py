"""workers.encode: each format streams (bytes before finish) and the joined output decodes back to the tone."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest

from workers.audio import decode, float_to_pcm16
from workers.encode import CONTENT_TYPES, FORMATS, EncodeError, StreamEncoder

# Codec priming and padding: LAME adds ~1100 samples and ADTS AAC carries no edit list to trim its
# 1024 priming samples, so those come back a little long; the others are sample-exact or nearly.
DURATION_TOLERANCE = {"mp3": 0.08, "aac": 0.08}


def tone_pcm(rate: int, seconds: float = 1.0, freq: float = 440.0, channels: int = 1) -> bytes:
    x = 0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)
    return float_to_pcm16(np.repeat(x, channels))


def stream(enc: StreamEncoder, pcm: bytes, chunks: int = 20) -> list[bytes]:
    step = -(-len(pcm) // chunks)
    return [enc.feed(pcm[i : i + step]) for i in range(0, len(pcm), step)] + [enc.finish()]


def decode_output(fmt: str, data: bytes, rate: int, channels: int = 1) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return decode(data, pcm_format="s16le", sample_rate=rate, channels=channels)
    return decode(data)


def peak_hz(x: np.ndarray, rate: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x.mean(axis=1)))) * rate / len(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_streams_and_decodes_back(fmt: str) -> None:
    enc = StreamEncoder(fmt, 24000)
    outs = stream(enc, tone_pcm(24000))
    before_finish = [len(o) for o in outs[:-1]]
    assert sum(before_finish) > 0, "nothing came out before finish()"
    if fmt in ("wav", "pcm", "mp3", "aac"):
        assert all(before_finish[2:]), before_finish  # a frame of output per 50 ms chunk
    if fmt == "opus":
        assert sum(map(bool, before_finish)) >= 5, before_finish  # one Ogg page per 100 ms
    y, rate = decode_output(fmt, b"".join(outs), enc.out_rate)
    assert rate == enc.out_rate and enc.content_type == CONTENT_TYPES[fmt]
    assert abs(len(y) / rate - 1.0) <= DURATION_TOLERANCE.get(fmt, 0.01)
    assert abs(peak_hz(y, rate) - 440) < 3


def test_output_rates() -> None:
    assert StreamEncoder("pcm", 22050).out_rate == 24000
    assert StreamEncoder("opus", 22050).out_rate == 48000
    assert StreamEncoder("wav", 22050).out_rate == 22050
    assert StreamEncoder("flac", 22050).out_rate == 22050
    assert StreamEncoder("mp3", 22050).out_rate == 22050
    assert StreamEncoder("mp3", 23000).out_rate == 24000  # LAME has a fixed list: the next higher one
    assert StreamEncoder("mp3", 96000).out_rate == 48000  # or its highest


def test_pcm_is_24k_s16le_from_any_rate_without_seams() -> None:
    enc = StreamEncoder("pcm", 22050)
    out = b"".join(stream(enc, tone_pcm(22050), chunks=37))
    assert abs(len(out) / 2 - 24000) <= 240
    y = np.frombuffer(out, "<i2").astype(np.float32) / 32768
    # A click at a chunk edge would show up as a jump far above the tone's largest step.
    steady = y[500:-500]
    assert np.abs(np.diff(steady)).max() < 1.2 * 0.5 * 2 * np.pi * 440 / 24000
    assert abs(peak_hz(y[:, None], 24000) - 440) < 2


def test_wav_stream_header_is_read_by_wave_and_ffmpeg() -> None:
    enc = StreamEncoder("wav", 16000)
    outs = stream(enc, tone_pcm(16000, 0.5))
    assert outs[0][:4] == b"RIFF" and outs[0][4:8] == b"\xff\xff\xff\xff"
    data = b"".join(outs)
    with wave.open(io.BytesIO(data)) as w:
        assert w.getframerate() == 16000 and len(w.readframes(10**9)) == 16000
    with av.open(io.BytesIO(data)) as f:
        assert sum(frame.samples for frame in f.decode(audio=0)) == 8000


def test_odd_sized_chunks_split_samples_correctly() -> None:
    pcm = tone_pcm(8000, 0.25, channels=2)
    enc = StreamEncoder("pcm", 24000, channels=2)  # no resampling: output bytes == input bytes
    assert b"".join(stream(enc, pcm, chunks=13)) == pcm and len(pcm) % 13
    enc = StreamEncoder("wav", 8000, channels=2)
    y, _ = decode(b"".join(enc.feed(pcm[i : i + 333]) for i in range(0, len(pcm), 333)) + enc.finish())
    assert y.shape == (2000, 2)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac", "aac"])
def test_stereo_compressed(fmt: str) -> None:
    enc = StreamEncoder(fmt, 24000, channels=2)
    y, rate = decode(b"".join(stream(enc, tone_pcm(24000, 0.5, channels=2))))
    assert y.shape[1] == 2 and abs(len(y) / rate - 0.5) < 0.1


HEADERS = {"wav": b"RIFF", "mp3": b"ID3", "opus": b"OggS", "flac": b"fLaC"}  # what a file of each starts with


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_stream_is_still_a_file(fmt: str) -> None:
    out = StreamEncoder(fmt, 24000).finish()
    if fmt in ("pcm", "aac"):
        assert out == b""  # raw PCM and ADTS have no header: no samples, no bytes at all
    else:
        assert out.startswith(HEADERS[fmt]), out[:16]


def test_bad_use_raises_encode_error() -> None:
    with pytest.raises(EncodeError, match="unknown audio format"):
        StreamEncoder("ogg-vorbis", 24000)
    with pytest.raises(EncodeError):
        StreamEncoder("mp3", 0)
    with pytest.raises(EncodeError):
        StreamEncoder("wav", 24000, channels=0)
    enc = StreamEncoder("mp3", 24000)
    enc.finish()
    with pytest.raises(EncodeError):
        enc.feed(b"\x00\x00")
    with pytest.raises(EncodeError):
        enc.finish()
