"""Whisper-compatible log-mel features in plain numpy, so the ASR worker needs no torch or librosa.

Same math as openai/whisper `log_mel_spectrogram` and faster-whisper's FeatureExtractor (MIT):
25 ms periodic Hann window (n_fft=400), 10 ms hop (160), reflect padding, power spectrum, Slaney
mel filterbank, log10 with a 1e-10 floor, 8 (log10 units = 80 dB) dynamic range, then (x + 4) / 4.
Matches faster-whisper 1.2.1 to 1.2e-7 (MODELS.md §3).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

import numpy as np

__all__ = ["HOP_LENGTH", "N_FFT", "N_FRAMES_30S", "SAMPLE_RATE", "log_mel_spectrogram", "mel_filters", "pad_or_trim"]

SAMPLE_RATE: Final = 16000  # what every Whisper checkpoint was trained on
N_FFT: Final = 400  # 25 ms window
HOP_LENGTH: Final = 160  # 10 ms hop: 100 frames per second
N_FRAMES_30S: Final = 3000  # the 30 s window the encoder expects

# Slaney mel scale constants (librosa's htk=False): linear below 1 kHz, logarithmic above.
_SLANEY_F_SP: Final = 200.0 / 3
_SLANEY_MIN_LOG_HZ: Final = 1000.0
_SLANEY_LOGSTEP: Final = float(np.log(6.4) / 27.0)
_MEL_8KHZ: Final = 45.245640471924965  # hz_to_mel(8000): the filterbank spans 0 Hz to Nyquist at 16 kHz
# np.hanning(N + 1)[:-1] is the periodic window torch.hann_window(N) gives; Whisper uses that one.
_WINDOW: Final = np.hanning(N_FFT + 1)[:-1].astype(np.float32)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-normalised mel filterbank [n_mels, n_fft // 2 + 1], identical to
    librosa.filters.mel(sr, n_fft, n_mels); cached because building it costs more than a short clip."""
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mels = np.linspace(0.0, _MEL_8KHZ, n_mels + 2)
    min_log_mel = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
    freqs = _SLANEY_F_SP * mels
    log_t = mels >= min_log_mel
    freqs[log_t] = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (mels[log_t] - min_log_mel))
    fdiff = np.diff(freqs)
    ramps = freqs[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney normalisation: each triangle has unit area, so wide high bands are not louder.
    weights *= (2.0 / (freqs[2 : n_mels + 2] - freqs[:n_mels]))[:, None]
    out = weights.astype(np.float32)
    out.setflags(write=False)  # shared through the cache
    return out


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Mono float32 audio in [-1, 1] at 16 kHz -> float32 [n_mels, (len(audio) + padding) // 160].

    `padding` appends zeros first, as Whisper does with 30 s of padding so the last window is whole.
    """
    x = np.asarray(audio, dtype=np.float32)
    if padding:
        x = np.pad(x, (0, padding))
    if len(x) <= N_FFT // 2:  # reflect padding needs more samples than it mirrors
        x = np.pad(x, (0, N_FFT // 2 + 1 - len(x)))
    x = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH]
    spec = np.fft.rfft(frames * _WINDOW, axis=-1)
    power = (spec.real**2 + spec.imag**2)[:-1]  # Whisper drops the last frame
    mel = power @ mel_filters(n_mels).T  # [T, n_mels]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return np.ascontiguousarray(((log_spec + 4.0) / 4.0).T, dtype=np.float32)


def pad_or_trim(features: np.ndarray, n_frames: int = N_FRAMES_30S) -> np.ndarray:
    """Zero-pad (as faster-whisper does) or cut the time axis to `n_frames`, the encoder's fixed input."""
    t = features.shape[-1]
    if t > n_frames:
        return features[..., :n_frames]
    if t < n_frames:
        pad = [(0, 0)] * (features.ndim - 1) + [(0, n_frames - t)]
        return np.pad(features, pad)
    return features
