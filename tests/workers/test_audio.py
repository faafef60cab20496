"""workers.audio: our WAV/raw PCM parser, PyAV decoding from memory, and the ASR conversion chain."""

from __future__ import annotations

import io
import struct
import subprocess
import wave

import av
import numpy as np
import pytest

from workers.audio import (
    MAX_SECONDS,
    MIN_RATE,
    PCM_FORMATS,
    AudioError,
    decode,
    float_to_pcm16,
    load_for_asr,
    normalize,
    pcm16_to_float,
    resample,
    to_mono,
    wav_bytes,
)

GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def tone(freq: float = 440.0, rate: int = 16000, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    x = x if x.ndim == 1 else x.mean(axis=1)
    return float(np.argmax(np.abs(np.fft.rfft(x))) * rate / len(x))


def chunk(cid: bytes, body: bytes) -> bytes:
    return cid + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def fmt_body(tag: int, channels: int, rate: int, bits: int) -> bytes:
    block = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)


def riff(*chunks: bytes, magic: bytes = b"RIFF", size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return magic + struct.pack("<I", len(body) if size is None else size) + body


def int_pcm(x: np.ndarray, bits: int) -> bytes:
    """Reference integer encoding, written independently of the parser (per-sample Python int.to_bytes)."""
    if bits == 8:
        return bytes(round(float(v) * 127) + 128 for v in x)
    scale = 2 ** (bits - 1) - 1
    return b"".join(round(float(v) * scale).to_bytes(bits // 8, "little", signed=True) for v in x)


def av_encode(container: str, codec: str, x: np.ndarray, rate: int, channels: int = 1, **options: str) -> bytes:
    buf = io.BytesIO()
    layout = "mono" if channels == 1 else "stereo"
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout, options=options or None)
        pcm = np.repeat(np.frombuffer(float_to_pcm16(x), "<i2"), channels)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- WAV


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_wav_integer_pcm_round_trip(bits: int) -> None:
    x = tone(rate=8000, seconds=0.25) * 1.9  # amplitude 0.95 reaches both signs' extremes
    data = riff(chunk(b"fmt ", fmt_body(1, 1, 8000, bits)), chunk(b"data", int_pcm(x, bits)))
    y, rate = decode(data)
    assert rate == 8000 and y.shape == (len(x), 1) and y.dtype == np.float32
    assert np.abs(y[:, 0] - x).max() < 2.0 / 2 ** (bits - 1)


@pytest.mark.parametrize(("bits", "dtype"), [(32, "<f4"), (64, "<f8")])
def test_wav_float_round_trip(bits: int, dtype: str) -> None:
    x = tone(rate=11025, seconds=0.2)
    data = riff(chunk(b"fmt ", fmt_body(3, 1, 11025, bits)), chunk(b"data", x.astype(dtype).tobytes()))
    y, rate = decode(data)
    assert rate == 11025 and np.array_equal(y[:, 0], x)


def test_wav_stereo_keeps_channels_and_downmixes_to_mean() -> None:
    left, right = tone(440, 8000, 0.25), np.full(2000, -0.25, np.float32)
    y, _ = decode(wav_bytes(np.stack([left, right], axis=1), 8000))
    assert y.shape == (2000, 2)
    assert np.allclose(y[:, 0], left, atol=1e-4) and np.allclose(y[:, 1], -0.25, atol=1e-4)
    assert np.allclose(to_mono(y), (left - 0.25) / 2, atol=1e-4)


@pytest.mark.parametrize(("subtag", "bits", "payload"), [(1, 16, "<i2"), (3, 32, "<f4")])
def test_wav_extensible_header(subtag: int, bits: int, payload: str) -> None:
    x = tone(rate=16000, seconds=0.1)
    samples = (x * 32767).round().astype(payload) if payload == "<i2" else x.astype(payload)
    ext = struct.pack("<HHI", 22, bits, 0x3) + subtag.to_bytes(2, "little") + GUID_TAIL
    stereo = np.repeat(samples, 2)  # two identical channels, interleaved
    data = riff(chunk(b"fmt ", fmt_body(0xFFFE, 2, 16000, bits) + ext), chunk(b"data", stereo.tobytes()))
    y, rate = decode(data)
    assert rate == 16000 and y.shape == (len(x), 2)
    assert np.allclose(y[:, 1], x, atol=1e-4)


def test_wav_skips_odd_chunk_padding_and_list() -> None:
    x = tone(rate=8000, seconds=0.1)
    info = chunk(b"LIST", b"INFOISFT" + struct.pack("<I", 5) + b"casa\x00\x00")
    data = riff(
        chunk(b"fmt ", fmt_body(1, 1, 8000, 16)),
        chunk(b"odd ", b"abc"),  # size 3: one padding byte follows
        info,
        chunk(b"data", float_to_pcm16(x)),
        chunk(b"id3 ", b"trailing metadata"),
    )
    y, _ = decode(data)
    assert len(y) == len(x) and np.allclose(y[:, 0], x, atol=1e-4)


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000, 0])
def test_wav_streaming_placeholder_sizes_read_to_end(placeholder: int) -> None:
    x = tone(rate=8000, seconds=0.5)
    pcm = float_to_pcm16(x) + b"\x01"  # a torn last sample is dropped
    fmt = chunk(b"fmt ", fmt_body(1, 1, 8000, 16))
    data = riff(fmt, b"data" + struct.pack("<I", placeholder) + pcm, size=placeholder)
    y, rate = decode(data)
    assert rate == 8000 and len(y) == len(x)


@pytest.mark.needs("espeak-ng")
def test_espeak_stdout_wav_with_placeholder_sizes() -> None:
    out = subprocess.run(["espeak-ng", "--stdout", "hello world"], capture_output=True, check=True).stdout
    assert out[40:44] != struct.pack("<I", len(out) - 44)  # really the streaming placeholder
    y, rate = decode(out)
    assert rate == 22050 and len(y) / rate > 0.3 and np.abs(y).max() > 0.05


def test_rifx_big_endian_and_rf64() -> None:
    x = tone(rate=8000, seconds=0.1)
    pcm_be = (x * 32767).round().astype(">i2").tobytes()
    fmt_be = struct.pack(">HHIIHH", 1, 1, 8000, 16000, 2, 16)
    rifx = b"RIFX" + struct.pack(">I", 4 + 8 + 16 + 8 + len(pcm_be)) + b"WAVE"
    rifx += b"fmt " + struct.pack(">I", 16) + fmt_be + b"data" + struct.pack(">I", len(pcm_be)) + pcm_be
    pcm = float_to_pcm16(x)
    ds64 = chunk(b"ds64", struct.pack("<QQQI", 0, len(pcm), len(x), 0))
    rf64 = riff(ds64, chunk(b"fmt ", fmt_body(1, 1, 8000, 16)), b"data\xff\xff\xff\xff" + pcm, magic=b"RF64")
    for data in (rifx, rf64):
        y, _ = decode(data)
        assert np.allclose(y[:, 0], x, atol=1e-4)


@pytest.mark.parametrize("codec", ["pcm_alaw", "pcm_mulaw"])
def test_wav_g711_matches_ffmpeg(codec: str) -> None:
    data = av_encode("wav", codec, np.linspace(-1, 1, 4000, dtype=np.float32), 8000)
    with av.open(io.BytesIO(data)) as f:
        ref = np.concatenate([fr.to_ndarray().ravel() for fr in f.decode(audio=0)]) / 32768.0
    y, rate = decode(data)
    assert rate == 8000 and np.array_equal(y[:, 0], ref.astype(np.float32))


# ------------------------------------------------------------------------------------------ raw PCM


@pytest.mark.parametrize(("pcm_format", "dtype"), [("s16le", "<i2"), ("pcm_s16le", "<i2"), ("f32le", "<f4")])
def test_raw_pcm_with_declared_format(pcm_format: str, dtype: str) -> None:
    x = tone(rate=24000, seconds=0.2)
    stereo = np.stack([x, -x], axis=1)
    body = (stereo * 32767).round().astype(dtype).tobytes() if dtype == "<i2" else stereo.astype(dtype).tobytes()
    y, rate = decode(body, pcm_format=pcm_format, sample_rate=24000, channels=2)
    assert rate == 24000 and y.shape == (len(x), 2)
    assert np.allclose(y[:, 0], x, atol=1e-4) and np.allclose(y[:, 1], -x, atol=1e-4)
    assert pcm_format in PCM_FORMATS


def test_raw_24_bit_and_unsigned_8_bit() -> None:
    x = tone(rate=8000, seconds=0.1)
    assert np.allclose(decode(int_pcm(x, 24), pcm_format="s24le", sample_rate=8000)[0][:, 0], x, atol=1e-6)
    assert np.allclose(decode(int_pcm(x, 8), pcm_format="u8", sample_rate=8000)[0][:, 0], x, atol=1e-2)


def test_content_type_l16_parameters_are_honoured() -> None:
    x = tone(rate=8000, seconds=0.1)
    body = np.repeat((x * 32767).round().astype(">i2"), 2).tobytes()  # RFC 2586: network byte order
    y, rate = decode(body, content_type='audio/L16; rate=8000; channels="2"')
    assert rate == 8000 and y.shape == (len(x), 2) and np.allclose(y[:, 0], x, atol=1e-4)
    y, rate = decode(float_to_pcm16(x), content_type="audio/pcm;rate=8000")
    assert rate == 8000 and np.allclose(y[:, 0], x, atol=1e-4)


def test_wav_header_wins_over_declared_raw_type() -> None:
    y, rate = decode(wav_bytes(tone(rate=8000), 8000), content_type="audio/pcm", sample_rate=16000)
    assert rate == 8000 and len(y) == 8000


# ------------------------------------------------------------------------------- PyAV containers


@pytest.mark.parametrize(
    ("container", "codec", "channels", "options"),
    [
        ("flac", "flac", 1, {}),
        ("mp3", "libmp3lame", 1, {}),
        ("ogg", "libopus", 1, {}),
        ("webm", "libopus", 1, {}),
        ("ipod", "aac", 1, {}),  # .m4a
        ("ogg", "vorbis", 2, {"strict": "experimental"}),  # ffmpeg's own Vorbis encoder is stereo-only
    ],
)
def test_compressed_containers_decode_from_memory(
    container: str, codec: str, channels: int, options: dict[str, str]
) -> None:
    data = av_encode(container, codec, tone(1000, 48000, 1.0), 48000, channels, **options)
    y, rate = decode(data, content_type="application/octet-stream")
    assert rate == 48000 and y.dtype == np.float32 and y.shape[1] == channels
    assert abs(len(y) / rate - 1.0) < 0.05
    assert abs(peak_hz(y, rate) - 1000) < 5


# ------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("rate_in", [22050, 44100, 48000, 8000])
def test_resample_to_16k_keeps_length_and_pitch(rate_in: int) -> None:
    y = resample(tone(440, rate_in, 1.0), rate_in, 16000)
    assert y.dtype == np.float32 and abs(len(y) - 16000) <= 1
    assert abs(peak_hz(y, 16000) - 440) < 2


def test_resample_same_rate_is_a_no_op() -> None:
    x = tone()
    assert resample(x, 16000, 16000) is x


def test_normalize_removes_nan_dc_and_clipping_without_amplifying() -> None:
    x = np.array([np.nan, np.inf, -np.inf, 3.0, -3.0, 0.5], np.float32)
    y = normalize(x)
    assert y.dtype == np.float32 and np.isfinite(y).all() and np.abs(y).max() <= 1.0
    quiet = tone(amp=0.01) + 0.2  # DC offset
    z = normalize(quiet)
    assert abs(float(z.mean())) < 1e-4 and np.abs(z).max() < 0.011


def test_load_for_asr_gives_mono_16k_float32() -> None:
    stereo = np.stack([tone(440, 44100, 0.5), tone(440, 44100, 0.5)], axis=1)
    y = load_for_asr(wav_bytes(stereo, 44100))
    assert y.dtype == np.float32 and y.ndim == 1 and abs(len(y) - 8000) <= 1
    assert abs(peak_hz(y, 16000) - 440) < 3


def test_over_long_audio_is_refused_before_conversion() -> None:
    long_u8 = b"\x80" * (MAX_SECONDS * MIN_RATE + 1)  # 14 MB: 4 h at the lowest rate we take
    with pytest.raises(AudioError, match="longer than"):
        load_for_asr(long_u8, pcm_format="u8", sample_rate=MIN_RATE)
    with pytest.raises(AudioError, match="longer than"):
        decode(riff(chunk(b"fmt ", fmt_body(1, 1, MIN_RATE, 8)), chunk(b"data", long_u8)))


def test_pcm16_helpers_round_trip() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, np.nan], np.float32)
    back = pcm16_to_float(float_to_pcm16(x))
    assert np.allclose(back, [0, 0.5, -0.5, 1, -1, 1, 0], atol=1e-4)
    with pytest.raises(AudioError):
        pcm16_to_float(b"\x00\x01\x02")


def test_wav_bytes_is_a_standard_wav() -> None:
    with wave.open(io.BytesIO(wav_bytes(tone(rate=8000, seconds=0.5), 8000))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 4000)


# ------------------------------------------------------------------------------------------ errors

GOOD_WAV = wav_bytes(tone(rate=8000, seconds=0.1), 8000)


@pytest.mark.parametrize(
    ("body", "kwargs", "message"),
    [
        (b"", {}, "empty audio"),
        (np.random.default_rng(1).bytes(4000), {}, "could not be decoded"),
        (b"ID3" + np.random.default_rng(2).bytes(4000), {}, r"looks like mp3\?"),
        (GOOD_WAV[:30], {}, "truncated WAV header"),
        (GOOD_WAV[:8], {}, "truncated WAV header"),
        (riff(chunk(b"fmt ", fmt_body(1, 1, 8000, 12)), chunk(b"data", b"\x00" * 64)), {}, "12-bit"),
        (riff(chunk(b"fmt ", fmt_body(1, 1, 8000, 16))), {}, "no data chunk"),
        (riff(chunk(b"fmt ", fmt_body(1, 0, 8000, 16)), chunk(b"data", b"\0\0")), {}, "channel count"),
        (riff(chunk(b"fmt ", fmt_body(1, 1, 0, 16)), chunk(b"data", b"\0\0")), {}, "sample rate"),
        (riff(chunk(b"fmt ", fmt_body(1, 1, 10**6, 16)), chunk(b"data", b"\0\0")), {}, "sample rate"),
        (b"\0\0", {"content_type": "audio/L16;rate=99999999999"}, "sample rate"),
        (GOOD_WAV[44:], {"pcm_format": "s16le"}, "raw PCM needs sample_rate"),
        (GOOD_WAV[44:], {"pcm_format": "s12le", "sample_rate": 8000}, "unknown pcm_format"),
        (GOOD_WAV[44:], {"content_type": "audio/pcm; rate=fast"}, "not a whole number"),
        (b"\x00\x01", {"pcm_format": "s32le", "sample_rate": 8000}, "empty audio"),
        (b"not audio at all, but some text", {"content_type": "audio/wav"}, "not a WAV file"),
    ],
)
def test_bad_input_raises_audio_error_with_a_message(body: bytes, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(AudioError, match=message):
        decode(body, **kwargs)  # type: ignore[arg-type]


def test_mangled_headers_only_ever_raise_audio_error() -> None:
    """Truncations and byte flips of a WAV and a FLAC file either decode or raise AudioError."""
    flac = av_encode("flac", "flac", tone(rate=8000, seconds=0.2), 8000)
    rng = np.random.default_rng(0)
    cases = [GOOD_WAV[:n] for n in range(0, 60)] + [flac[:n] for n in range(0, 200, 7)]
    for _ in range(150):
        b = bytearray(GOOD_WAV[:200] if rng.random() < 0.7 else flac[:2000])
        for i in rng.integers(0, 48, size=3):
            b[i] = int(rng.integers(0, 256))
        cases.append(bytes(b))
    for body in cases:
        try:
            decode(body)
        except AudioError as exc:
            assert str(exc)
