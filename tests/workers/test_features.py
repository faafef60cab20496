"""workers.features: Whisper log-mel shapes, padding, and one frame checked against a direct STFT."""

from __future__ import annotations

import numpy as np
import pytest

from workers.features import HOP_LENGTH, N_FFT, N_FRAMES_30S, SAMPLE_RATE, log_mel_spectrogram, mel_filters, pad_or_trim


def tone(freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_shape_and_dtype_for_10_seconds(n_mels: int) -> None:
    feats = log_mel_spectrogram(tone(440, 10.0), n_mels=n_mels)
    assert feats.shape == (n_mels, 10 * SAMPLE_RATE // HOP_LENGTH) and feats.dtype == np.float32
    assert feats.flags.c_contiguous and np.isfinite(feats).all()


def test_padding_appends_frames() -> None:
    feats = log_mel_spectrogram(tone(440, 1.0), padding=30 * SAMPLE_RATE)
    assert feats.shape == (80, 100 + N_FRAMES_30S)


def test_pad_or_trim_to_30_seconds() -> None:
    short = log_mel_spectrogram(tone(440, 10.0))
    padded = pad_or_trim(short)
    assert padded.shape == (80, N_FRAMES_30S)
    assert np.array_equal(padded[:, :1000], short) and not padded[:, 1000:].any()
    long = np.ones((80, 3500), np.float32)
    assert pad_or_trim(long).shape == (80, N_FRAMES_30S)
    exact = np.ones((80, N_FRAMES_30S), np.float32)
    assert pad_or_trim(exact) is exact


def test_filterbank_is_non_negative_with_every_band_used() -> None:
    for n_mels in (80, 128):
        fb = mel_filters(n_mels)
        assert fb.shape == (n_mels, N_FFT // 2 + 1) and fb.dtype == np.float32
        assert (fb >= 0).all() and (fb.max(axis=1) > 0).all()
        peaks = fb.argmax(axis=1)
        assert (np.diff(peaks) >= 0).all()  # bands climb in frequency


def test_silence_and_tone_differ_and_tone_lands_in_its_band() -> None:
    silence = log_mel_spectrogram(np.zeros(SAMPLE_RATE, np.float32))
    feats = log_mel_spectrogram(tone(1000, 1.0))
    assert not np.allclose(silence, feats)
    band = int(feats.mean(axis=1).argmax())
    band_hz = mel_filters(80)[band].argmax() * SAMPLE_RATE / N_FFT
    assert abs(band_hz - 1000) < 80


@pytest.mark.parametrize("k", [0, 37])
def test_one_frame_matches_a_direct_stft(k: int) -> None:
    """Frame k is centred on sample k*hop; frame 0 reaches into the mirrored (reflect) start."""
    rng = np.random.default_rng(0)
    x = (tone(700, 1.0) + 0.05 * rng.standard_normal(SAMPLE_RATE)).astype(np.float32)
    feats = log_mel_spectrogram(x)
    half = N_FFT // 2
    padded = np.concatenate([x[1 : half + 1][::-1], x])  # reflect: mirror without repeating x[0]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    spectrum = np.fft.rfft(padded[k * HOP_LENGTH : k * HOP_LENGTH + N_FFT].astype(np.float64) * window)
    mel = mel_filters(80).astype(np.float64) @ np.abs(spectrum) ** 2
    top = feats.max() * 4.0 - 4.0  # undo (x + 4) / 4 to get the global log10 maximum
    expected = (np.maximum(np.log10(np.maximum(mel, 1e-10)), top - 8.0) + 4.0) / 4.0
    assert np.allclose(feats[:, k], expected, atol=1e-4)


def test_very_short_audio_does_not_crash() -> None:
    assert log_mel_spectrogram(np.zeros(10, np.float32)).shape == (80, 1)
