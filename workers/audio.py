"""Decode whatever audio a client uploads into float32 samples for ASR.

WAV and raw PCM are parsed here with numpy (no copies beyond the float conversion, no ffmpeg
start-up cost, and control over the quirks streaming writers leave in headers); every other
container (FLAC, MP3, Ogg, WebM, M4A, ...) goes through PyAV from memory. Every failure
surfaces as `AudioError`, whose message is shown to the client in a 400.
"""

from __future__ import annotations

import io
import struct
from typing import Final, NamedTuple

import numpy as np

__all__ = [
    "MAX_CHANNELS",
    "MAX_RATE",
    "MAX_SECONDS",
    "MIN_RATE",
    "PCM_FORMATS",
    "AudioError",
    "PcmFormat",
    "decode",
    "float_to_pcm16",
    "load_for_asr",
    "normalize",
    "pcm16_to_float",
    "resample",
    "to_mono",
    "wav_bytes",
    "wav_header",
]

# Whisper handles long audio by 30 s windows, so length is only a cost question; 4 h covers a long
# meeting or lecture (OpenAI's API caps uploads at 25 MB, AssemblyAI at 10 h) and bounds memory.
MAX_SECONDS: Final = 4 * 3600
# Third-order ambisonics uses 16 channels and the WAVE_FORMAT_EXTENSIBLE mask names 18 speakers;
# 64 is generous and stops a forged header from turning a small body into a huge reshape.
MAX_CHANNELS: Final = 64
# Telephony bottoms out at 8 kHz and studio DACs top out at 768 kHz; outside that a header is forged
# or broken, and resampling it to 16 kHz would blow the output up (1 Hz -> 16 kHz is 16000x).
MIN_RATE: Final = 1000
MAX_RATE: Final = 768_000
# A legitimate WAV has a handful of chunks; a forged one made of 8-byte chunks would spin the loop.
_MAX_WAV_CHUNKS: Final = 4096


class AudioError(ValueError):
    """Input audio that cannot be decoded; the message goes to the client, so it names the problem."""


class PcmFormat(NamedTuple):
    """How one raw sample is stored: kind "i" signed, "u" unsigned, "f" float, "a" A-law, "m" mu-law."""

    kind: str
    width: int  # bytes per sample
    big_endian: bool = False


_CANONICAL: Final = {
    "u8": PcmFormat("u", 1),
    "s8": PcmFormat("i", 1),
    "s16le": PcmFormat("i", 2),
    "s16be": PcmFormat("i", 2, True),
    "s24le": PcmFormat("i", 3),
    "s24be": PcmFormat("i", 3, True),
    "s32le": PcmFormat("i", 4),
    "s32be": PcmFormat("i", 4, True),
    "f32le": PcmFormat("f", 4),
    "f32be": PcmFormat("f", 4, True),
    "f64le": PcmFormat("f", 8),
    "alaw": PcmFormat("a", 1),
    "mulaw": PcmFormat("m", 1),
}
# ffmpeg spells them pcm_s16le, pcm_alaw, ...; "ulaw" is the other common mu-law name.
PCM_FORMATS: Final[dict[str, PcmFormat]] = {
    **_CANONICAL,
    **{f"pcm_{name}": fmt for name, fmt in _CANONICAL.items()},
    "ulaw": _CANONICAL["mulaw"],
    "pcm_ulaw": _CANONICAL["mulaw"],
}

# Raw content types and the sample format they imply. L16/L24 are big-endian (RFC 2586, RFC 3190);
# audio/pcm is what OpenAI-style clients send (s16le); audio/basic is 8 kHz mu-law (RFC 2046).
_RAW_TYPES: Final = {
    "audio/pcm": "s16le",
    "audio/l16": "s16be",
    "audio/l24": "s24be",
    "audio/l8": "u8",
    "audio/basic": "mulaw",
    "audio/pcmu": "mulaw",
    "audio/pcma": "alaw",
}
_RAW_DEFAULT_RATE: Final = {"audio/basic": 8000, "audio/pcmu": 8000, "audio/pcma": 8000}
_WAV_TYPES: Final = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")

_FMT_LE: Final = struct.Struct("<HHIIHH")  # tag, channels, rate, byte rate, block align, bits
_FMT_BE: Final = struct.Struct(">HHIIHH")
_DS64: Final = struct.Struct("<QQQ")  # RF64: riff size, data size, sample count
# KSDATAFORMAT_SUBTYPE_* GUIDs are the format tag followed by this fixed tail.
_GUID_TAIL: Final = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_TAG_PCM, _TAG_FLOAT, _TAG_ALAW, _TAG_MULAW, _TAG_EXTENSIBLE = 1, 3, 6, 7, 0xFFFE


def _g711_tables() -> tuple[np.ndarray, np.ndarray]:
    """A-law and mu-law expansion tables (ITU-T G.711), float32 in [-1, 1]."""
    code = np.arange(256, dtype=np.int32)
    u = ~code & 0xFF
    mag = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    mulaw = np.where(u & 0x80, 0x84 - mag, mag - 0x84)
    a = code ^ 0x55
    seg, mant = (a >> 4) & 7, a & 0x0F
    mag = np.where(seg == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(seg - 1, 0))
    alaw = np.where(a & 0x80, mag, -mag)
    return (alaw / 32768.0).astype(np.float32), (mulaw / 32768.0).astype(np.float32)


_ALAW, _MULAW = _g711_tables()


def _samples(raw: memoryview, fmt: PcmFormat, channels: int) -> np.ndarray:
    """Whole frames of `raw` as float32 [frames, channels]; a partial trailing frame is dropped."""
    frame = fmt.width * channels
    raw = raw[: len(raw) - len(raw) % frame]
    order = ">" if fmt.big_endian else "<"
    if fmt.kind == "a" or fmt.kind == "m":
        x = (_ALAW if fmt.kind == "a" else _MULAW)[np.frombuffer(raw, np.uint8)]
    elif fmt.kind == "u":
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif fmt.kind == "f":
        x = np.frombuffer(raw, f"{order}f{fmt.width}").astype(np.float32)
    elif fmt.width == 3:
        # Place the 3 bytes in the top of an int32 so the sign comes for free, then scale by 2**31.
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        wide = np.zeros((len(b), 4), np.uint8)
        if fmt.big_endian:
            wide[:, :3] = b
        else:
            wide[:, 1:] = b
        x = wide.view(f"{order}i4").ravel() * np.float32(2.0**-31)
    else:
        scale = np.float32(2.0 ** (1 - 8 * fmt.width))
        x = np.frombuffer(raw, f"{order}i{fmt.width}") * scale
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, channels)


def _check_shape(frames: int, rate: int, channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"unsupported channel count: {channels} (1 to {MAX_CHANNELS})")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"unsupported sample rate: {rate} Hz ({MIN_RATE} to {MAX_RATE})")
    if frames > MAX_SECONDS * rate:
        raise AudioError(f"audio is longer than {MAX_SECONDS // 3600} hours")


def _decode_raw(buf: memoryview, pcm_format: str, rate: int, channels: int) -> tuple[np.ndarray, int]:
    fmt = PCM_FORMATS.get(pcm_format.strip().lower())
    if fmt is None:
        names = ", ".join(_CANONICAL)
        raise AudioError(f"unknown pcm_format {pcm_format!r}: expected one of {names}")
    if rate <= 0:
        raise AudioError("raw PCM needs sample_rate")
    _check_shape(len(buf) // (fmt.width * max(channels, 1)), rate, channels)
    return _samples(buf, fmt, channels), rate


def _wav_format(body: memoryview, big: bool) -> tuple[PcmFormat | None, int, int, int]:
    """Parse a fmt chunk -> (sample format or None for codecs we leave to ffmpeg, tag, channels, rate)."""
    if len(body) < _FMT_LE.size:
        raise AudioError(f"truncated WAV header: fmt chunk is {len(body)} bytes, needs 16")
    tag, channels, rate, _, _, bits = (_FMT_BE if big else _FMT_LE).unpack_from(body)
    if tag == _TAG_EXTENSIBLE:  # then cbSize, valid bits, channel mask and the sub-format GUID at 24
        if len(body) < 40:
            raise AudioError("truncated WAV header: WAVE_FORMAT_EXTENSIBLE fmt chunk is too short")
        guid = bytes(body[24:40])
        if guid[2:] != _GUID_TAIL:
            raise AudioError(f"unsupported WAV sub-format GUID {guid.hex()}")
        tag = int.from_bytes(guid[:2], "little")
    _check_shape(0, rate, channels)
    if tag == _TAG_PCM:
        if bits not in (8, 16, 24, 32):
            raise AudioError(f"unsupported WAV sample format: {bits}-bit")
        return PcmFormat("u" if bits == 8 else "i", bits // 8, big), tag, channels, rate
    if tag == _TAG_FLOAT:
        if bits not in (32, 64):
            raise AudioError(f"unsupported WAV sample format: {bits}-bit float")
        return PcmFormat("f", bits // 8, big), tag, channels, rate
    if tag in (_TAG_ALAW, _TAG_MULAW):
        if bits != 8:
            raise AudioError(f"unsupported WAV sample format: {bits}-bit G.711")
        return PcmFormat("a" if tag == _TAG_ALAW else "m", 1), tag, channels, rate
    return None, tag, channels, rate


def _wav_chunks(buf: memoryview, big: bool) -> tuple[memoryview, memoryview]:
    """-> (fmt body, data body). Unknown chunks are skipped; an oversized data chunk runs to the end."""
    rf64 = bytes(buf[:4]) in (b"RF64", b"BW64")
    riff_size = int.from_bytes(bytes(buf[4:8]), "big" if big else "little")
    fmt: memoryview | None = None
    data: memoryview | None = None
    data_size64: int | None = None
    pos = 12
    for _ in range(_MAX_WAV_CHUNKS):
        if pos + 8 > len(buf) or (fmt is not None and data is not None):
            break
        cid = bytes(buf[pos : pos + 4])
        size = int.from_bytes(bytes(buf[pos + 4 : pos + 8]), "big" if big else "little")
        start, left = pos + 8, len(buf) - pos - 8
        if cid == b"ds64" and rf64 and min(size, left) >= _DS64.size:
            data_size64 = _DS64.unpack_from(buf, start)[1]
        if cid == b"data":
            if size == 0xFFFFFFFF and data_size64 is not None:
                size = data_size64
            # Streaming writers (espeak-ng, ffmpeg pipes) leave placeholder sizes; some write 0.
            if size > left or (size == 0 and (riff_size == 0 or riff_size + 8 > len(buf))):
                size = left
            data = buf[start : start + size]
        elif size > left:
            raise AudioError(f"truncated WAV header: chunk {cid!r} declares {size} bytes but {left} remain")
        elif cid == b"fmt ":
            fmt = buf[start : start + size]
        pos = start + size + (size & 1)  # chunks are word-aligned
    if fmt is None:
        raise AudioError("truncated WAV header: no fmt chunk" if data is None else "WAV has no fmt chunk")
    if data is None:
        raise AudioError("WAV has no data chunk")
    return fmt, data


def _decode_wav(buf: memoryview) -> tuple[np.ndarray, int]:
    if len(buf) < 12:
        raise AudioError(f"truncated WAV header: {len(buf)} bytes")
    if bytes(buf[8:12]) != b"WAVE":
        raise AudioError(f"not a WAV file: RIFF form type is {bytes(buf[8:12])!r}, not 'WAVE'")
    big = bytes(buf[:4]) == b"RIFX"
    fmt_body, data = _wav_chunks(buf, big)
    fmt, tag, channels, rate = _wav_format(fmt_body, big)
    if fmt is None:  # ADPCM, GSM, MP3-in-WAV...: ffmpeg knows them
        try:
            return _decode_av(buf)
        except AudioError as exc:
            raise AudioError(f"unsupported WAV encoding: format tag {tag:#06x} ({exc})") from exc
    _check_shape(len(data) // (fmt.width * channels), rate, channels)
    return _samples(data, fmt, channels), rate


def _sniff(buf: memoryview) -> str:
    """Best guess of a container from its magic bytes, only used to make error messages helpful."""
    head = bytes(buf[:12])
    magic = {
        b"fLaC": "flac",
        b"OggS": "ogg",
        b"ID3": "mp3",
        b"\x1aE\xdf\xa3": "webm/matroska",
        b"caff": "caf",
        b"#!AMR": "amr",
        b"\x30\x26\xb2\x75": "wma/asf",
    }
    for prefix, name in magic.items():
        if head.startswith(prefix):
            return name
    if head[4:8] == b"ftyp":
        return "mp4/m4a"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "aac"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "mp3"
    return ""


def _decode_av(buf: memoryview) -> tuple[np.ndarray, int]:
    """Decode any container ffmpeg knows, from memory; keeps the stream's rate and channel layout."""
    import av  # deferred: PyAV loads ffmpeg's shared libraries, which WAV/PCM-only workers never need

    chunks: list[np.ndarray] = []
    frames, rate, channels, error = 0, 0, 0, ""
    try:
        with av.open(io.BytesIO(bytes(buf)), mode="r", metadata_errors="ignore") as container:
            stream = container.streams.audio[0]
            resampler, src = None, (0, "")
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError as exc:  # one corrupt packet: skip it, as ffmpeg does
                    error = exc.strerror or str(exc)
                    continue
                for frame in decoded:
                    if resampler is None or frame.sample_rate != src[0] or frame.layout.name != src[1]:
                        if resampler is None:
                            rate, layout = frame.sample_rate, frame.layout.name
                            channels = frame.layout.nb_channels
                            _check_shape(0, rate, channels)
                        # A stream may switch parameters mid-way; convert everything to the first frame's.
                        src = (frame.sample_rate, frame.layout.name)
                        resampler = av.AudioResampler(format="flt", layout=layout, rate=rate)
                    for out in resampler.resample(frame):
                        chunks.append(out.to_ndarray().reshape(-1, channels))
                        frames += len(chunks[-1])
                    _check_shape(frames, rate, channels)
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, EOFError, OSError) as exc:
        if not chunks:  # a truncated tail after good audio is tolerated, like ffmpeg does
            error = "no audio stream" if isinstance(exc, IndexError) else getattr(exc, "strerror", None) or str(exc)
    if not chunks or not frames:
        guess = _sniff(buf)
        hint = f"looks like {guess}?" if guess else "unrecognised format"
        raise AudioError(f"audio could not be decoded ({hint}): {error or 'no audio samples'}")
    return np.concatenate(chunks).astype(np.float32, copy=False), rate


def decode(
    data: bytes | bytearray | memoryview,
    *,
    content_type: str = "",
    filename: str = "",
    pcm_format: str = "",
    sample_rate: int = 0,
    channels: int = 1,
) -> tuple[np.ndarray, int]:
    """Decode an upload into float32 samples in [-1, 1].

    A RIFF/RIFX/RF64 WAVE header always wins (it is self-describing). Otherwise the body is raw PCM
    when `pcm_format` is given or `content_type` is a raw type (audio/pcm s16le, audio/L16 s16be,
    audio/L24, audio/basic, audio/PCMU, audio/PCMA; its rate= and channels= parameters fill in
    what the arguments leave unset). Anything else goes to ffmpeg (PyAV) from memory.

    Returns:
        (samples shaped [frames, channels], sample rate).

    Raises:
        AudioError: empty, undecodable, unsupported or over-long audio; the message says which.
    """
    try:
        buf = memoryview(data).cast("B")
    except TypeError as exc:
        raise AudioError(f"audio must be bytes, not {type(data).__name__}") from exc
    if not len(buf):
        raise AudioError("empty audio")
    mime, params = _parse_content_type(content_type)
    if bytes(buf[:4]) in (b"RIFF", b"RIFX", b"RF64", b"BW64") and (len(buf) < 12 or bytes(buf[8:12]) == b"WAVE"):
        x, rate = _decode_wav(buf)
    elif pcm_format or mime in _RAW_TYPES:
        rate = sample_rate or _int_param(params, "rate") or _RAW_DEFAULT_RATE.get(mime, 0)
        ch = channels if channels != 1 else _int_param(params, "channels") or 1
        x, rate = _decode_raw(buf, pcm_format or _RAW_TYPES[mime], rate, ch)
    else:
        try:
            x, rate = _decode_av(buf)
        except AudioError as exc:
            if mime in _WAV_TYPES or filename.lower().endswith((".wav", ".wave")):
                raise AudioError(f"not a WAV file: no RIFF/WAVE header ({exc})") from exc
            raise
    if not len(x):
        raise AudioError("empty audio")
    return x, rate


def _parse_content_type(content_type: str) -> tuple[str, dict[str, str]]:
    mime, _, rest = content_type.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        key, eq, value = item.partition("=")
        if eq:
            params[key.strip().lower()] = value.strip().strip('"')
    return mime.strip().lower(), params


def _int_param(params: dict[str, str], name: str) -> int:
    value = params.get(name, "")
    if not value:
        return 0
    if not value.isdigit():
        raise AudioError(f"content-type parameter {name}={value!r} is not a whole number")
    return int(value)


def to_mono(x: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames] by averaging: ASR models are mono and a mean keeps the level."""
    x = np.asarray(x, dtype=np.float32)
    return x if x.ndim == 1 else x.mean(axis=1, dtype=np.float32)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """soxr HQ: as fast as linear interpolation here but without its aliasing (MODELS.md §6)."""
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    x = np.asarray(x, dtype=np.float32)
    if rate_in == rate_out or not len(x):
        return x
    import soxr

    return np.asarray(soxr.resample(x, rate_in, rate_out, quality="HQ"), dtype=np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Make samples safe for the model: finite, no DC offset, within [-1, 1]. Never amplifies,
    so quiet audio stays quiet rather than having its noise floor boosted."""
    y = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if len(y):
        y = y - y.mean(axis=0, dtype=np.float64).astype(np.float32)
    return np.clip(y, -1.0, 1.0, out=y)


def load_for_asr(
    data: bytes | bytearray | memoryview,
    *,
    content_type: str = "",
    filename: str = "",
    pcm_format: str = "",
    sample_rate: int = 0,
    channels: int = 1,
    rate: int = 16000,
) -> np.ndarray:
    """decode -> to_mono -> resample(rate) -> normalize.

    Returns:
        mono float32 samples at `rate`.

    Raises:
        AudioError: see `decode`; also empty audio and audio longer than MAX_SECONDS.
    """
    x, src_rate = decode(
        data,
        content_type=content_type,
        filename=filename,
        pcm_format=pcm_format,
        sample_rate=sample_rate,
        channels=channels,
    )
    _check_shape(len(x), src_rate, x.shape[1])
    y = normalize(resample(to_mono(x), src_rate, rate))
    if not len(y):
        raise AudioError("empty audio")
    return np.ascontiguousarray(y)


def pcm16_to_float(b: bytes | bytearray | memoryview) -> np.ndarray:
    """Little-endian PCM16 -> float32 in [-1, 1)."""
    if len(memoryview(b).cast("B")) % 2:
        raise AudioError("PCM16 data has an odd number of bytes")
    return np.frombuffer(b, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def float_to_pcm16(x: np.ndarray) -> bytes:
    """float32 -> little-endian PCM16: NaN becomes 0, then clip, scale by 32767 and round."""
    y = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
    return (np.clip(y, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(rate: int, channels: int = 1, data_bytes: int | None = None) -> bytes:
    """44-byte PCM16 WAV header; `data_bytes=None` writes 0xFFFFFFFF sizes for a stream of unknown length."""
    block = 2 * channels
    data_size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff_size = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        *(b"RIFF", riff_size, b"WAVE", b"fmt ", 16, _TAG_PCM, channels, rate, rate * block, block, 16),
        *(b"data", data_size),
    )


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    """float32 [frames] or [frames, channels] -> a complete PCM16 WAV file."""
    x = np.asarray(x, dtype=np.float32)
    channels = 1 if x.ndim == 1 else x.shape[1]
    pcm = float_to_pcm16(x)
    return wav_header(rate, channels, len(pcm)) + pcm
