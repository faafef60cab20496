"""Stage accounting (the stages add up to the run, never overlap) and the WAV join of per-sentence
answers (one continuous stream: one header, every sentence's samples)."""

from __future__ import annotations

import struct

import pytest

from casola.flow.clock import StageClock
from casola.flow.wav import WavFormatError, WavJoin


def test_each_instant_counts_for_the_first_step_in_flight_and_the_rest_is_overhead() -> None:
    c = StageClock(["asr", "llm", "tts"], 0.0)
    c.begin(0, 0.001)  # 1 ms before the first step: overhead
    c.end(0, 0.101)  # asr 100 ms
    c.begin(1, 0.102)  # 1 ms between steps
    c.begin(2, 0.150)  # TTS of sentence 1 while the LLM still generates: the LLM's time
    c.end(2, 0.200)
    c.end(1, 0.400)
    c.begin(2, 0.4005)
    c.end(2, 0.500)
    st = c.stages(0.501)
    assert st["step.asr"] == pytest.approx(100)
    assert st["step.llm"] == pytest.approx(298)
    assert st["step.tts"] == pytest.approx(99.5)
    assert st["flow-overhead"] == pytest.approx(1 + 1 + 0.5 + 1)
    assert sum(st.values()) == pytest.approx(501)


def _wav(samples: bytes, rate: int = 22050, extra: bytes = b"") -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def _read(wav: bytes) -> tuple[int, bytes]:
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    at = wav.index(b"data")
    return struct.unpack_from("<I", wav, at + 4)[0], wav[at + 8 :]


def test_sentences_join_into_one_wav_with_one_header() -> None:
    join = WavJoin()
    one, two = _wav(b"\x01\x00" * 100), _wav(b"\x02\x00" * 50, extra=b"LIST\x04\x00\x00\x00abcd")
    out = b""
    for n, wav in ((1, one), (2, two)):
        for i in range(0, len(wav), 7):  # the pieces split headers anywhere
            out += join.feed(n, wav[i : i + 7], "audio/wav")
    size, samples = _read(out)
    assert size == 0xFFFFFFFF  # a stream of unknown length
    assert samples == b"\x01\x00" * 100 + b"\x02\x00" * 50
    assert out.count(b"RIFF") == 1


def test_a_sentence_in_another_format_is_an_error_and_other_types_pass_as_they_are() -> None:
    join = WavJoin()
    join.feed(1, _wav(b"\x00\x00", 22050), "audio/wav")
    with pytest.raises(WavFormatError):
        join.feed(2, _wav(b"\x00\x00", 16000), "audio/wav")
    assert WavJoin().feed(1, b"ID3...", "audio/mpeg") == b"ID3..."
