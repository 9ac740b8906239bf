"""The reference clip's features as ZipVoice trains on them: a 24 kHz log-magnitude mel
spectrogram (1024-point FFT, hop 256, 100 HTK mels, centred reflect-padded frames, no mel
normalisation), one frame per 256 samples rounded to nearest."""
from __future__ import annotations

import math

import torch
from torch import Tensor

RATE, N_FFT, HOP, N_MELS = 24000, 1024, 256, 100


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = RATE) -> Tensor:
    """Triangular HTK-scale filters (n_fft//2+1, n_mels) from 0 Hz to rate/2."""
    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    freqs = torch.linspace(0, rate // 2, n_fft // 2 + 1)
    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2)
    points = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    diff = points[1:] - points[:-1]
    slopes = points[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


def log_mel(wave: Tensor) -> Tensor:
    """Mono 24 kHz samples (n,) -> (frames, n_mels) with frames = (n + HOP//2) // HOP."""
    spec = torch.stft(wave[None], N_FFT, HOP, N_FFT, torch.hann_window(N_FFT, device=wave.device),
                      center=True, pad_mode="reflect", return_complex=True).abs()[0]
    mel = (mel_filters().to(wave.device).T @ spec).clamp(min=1e-7).log().T
    frames = (wave.shape[0] + HOP // 2) // HOP
    if mel.shape[0] >= frames:
        return mel[:frames]
    return torch.cat([mel, mel[-1:].expand(frames - mel.shape[0], -1)])
