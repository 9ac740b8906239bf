"""LuxTTS's vocoder (LinaCodec's Vocos): a ConvNeXt backbone over 24 kHz mel frames, two ISTFT
heads — one at 24 kHz, one at 48 kHz after a transposed-conv upsampler — merged by an FFT
crossover: low frequencies from the 24 kHz path (resampled to 48 kHz), high ones from the
48 kHz path. Parameter names follow the checkpoint's vocos.bin (weight-norm already folded)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.transpose(1, 2)


class Backbone(nn.Module):
    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int):
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, 7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim)
                                      for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, mel: Tensor) -> Tensor:
        """(B, n_mels, T) -> (B, T, dim)"""
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


class ISTFT(nn.Module):
    """Inverse STFT with Hann window: "center" as torch.istft, "same" trims (win-hop)/2 on each
    side and divides by the summed squared window (what Vocos trains with)."""

    def __init__(self, n_fft: int, hop: int, padding: str):
        super().__init__()
        if padding not in ("center", "same"):
            raise ValueError(f"ISTFT padding must be 'center' or 'same', not {padding!r}")
        self.n_fft, self.hop, self.padding = n_fft, hop, padding
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, spec: Tensor) -> Tensor:
        if self.padding == "center":
            return torch.istft(spec, self.n_fft, self.hop, self.n_fft, self.window, center=True)
        frames = spec.shape[-1]
        pad = (self.n_fft - self.hop) // 2
        size = (frames - 1) * self.hop + self.n_fft
        chunks = torch.fft.irfft(spec, self.n_fft, dim=1) * self.window[None, :, None]
        fold = dict(output_size=(1, size), kernel_size=(1, self.n_fft), stride=(1, self.hop))
        y = F.fold(chunks, **fold)[:, 0, 0, pad:size - pad]
        envelope = F.fold(self.window.square()[None, :, None].expand(1, -1, frames),
                          **fold)[0, 0, 0, pad:size - pad]
        return y / envelope


class ISTFTHead(nn.Module):
    def __init__(self, dim: int, n_fft: int, hop_length: int, padding: str = "same"):
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length, padding)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, samples)"""
        mag, phase = self.out(x).transpose(1, 2).chunk(2, dim=1)
        mag = mag.exp().clamp(max=1e2)
        return self.istft(torch.polar(mag, phase))


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


class Snake(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return snake(x, self.alpha)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels, eps=1e-6)
        self.snake1 = Snake(channels)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, channels, eps=1e-6)
        self.snake2 = Snake(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.snake1(self.norm1(x)))
        return x + self.conv2(self.snake2(self.norm2(h)))


class Upsampler(nn.Module):
    """Transposed convolutions halving the channels at each step, each followed by a residual
    block, then a projection back to the backbone's width and a snake."""

    def __init__(self, in_channels: int, upsample_factors: list[int],
                 kernel_sizes: Optional[list[int]] = None):
        super().__init__()
        kernel_sizes = list(kernel_sizes or [8] * len(upsample_factors))
        self.upsample_layers, self.resnet_blocks = nn.ModuleList(), nn.ModuleList()
        for i, (k, u) in enumerate(zip(kernel_sizes, upsample_factors)):
            c_in, c_out = in_channels >> i, in_channels >> (i + 1)
            self.upsample_layers.append(nn.ConvTranspose1d(c_in, c_out, k, stride=u,
                                                           padding=(k - u) // 2))
            self.resnet_blocks.append(ResnetBlock(c_out))
        self.out_proj = nn.Linear(in_channels >> len(upsample_factors), in_channels)
        self.final_snake = Snake(in_channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T) -> (B, C, T * prod(factors))"""
        for up, block in zip(self.upsample_layers, self.resnet_blocks):
            x = block(up(x))
        return self.final_snake(self.out_proj(x.transpose(1, 2)).transpose(1, 2))


def resample_kernel(orig: int, new: int, width_zeros: int = 6, rolloff: float = 0.99):
    """A Hann-windowed sinc interpolation kernel (new, 1, taps) and its half-width, with the
    definitions of torchaudio's default resampler so the two agree."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + idx) * base
    t = t.clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    return sinc * window * (base / orig), width, orig, new


def resample(x: Tensor, kernel: Tensor, width: int, orig: int, new: int) -> Tensor:
    """(B, samples) at orig -> (B, ceil(samples * new / orig))"""
    n = x.shape[-1]
    y = F.conv1d(F.pad(x, (width, width + orig))[:, None], kernel.to(x), stride=orig)
    return y.transpose(1, 2).reshape(x.shape[0], -1)[:, :math.ceil(new * n / orig)]


def crossover(high: Tensor, low: Tensor, rate: int, cutoff: float, transition_bins: int = 8):
    """Spectrum of `high` above `cutoff` Hz, of `low` below it, with a cubic fade over
    `transition_bins` bins."""
    spec_high, spec_low = torch.fft.rfft(high), torch.fft.rfft(low)
    bins = spec_high.shape[-1]
    centre = int(cutoff / (rate / 2) * bins)
    start, end = max(0, centre - transition_bins // 2), min(bins, centre + transition_bins // 2)
    u = (torch.linspace(-1, 1, end - start) + 1) / 2
    mask = torch.ones(bins)
    mask[:start] = 0
    mask[start:end] = 3 * u ** 2 - 2 * u ** 3
    mask = mask.to(high.device)
    return torch.fft.irfft(spec_high * mask + spec_low * (1 - mask), n=high.shape[-1])


class Vocoder(nn.Module):
    rate = 48000

    def __init__(self, backbone: dict, head: dict, upsampler: dict, head_48k: dict,
                 low_rate: int = 24000, cutoff: float = 12000.0):
        super().__init__()
        self.backbone = Backbone(**backbone)
        self.head = ISTFTHead(**head)
        self.upsampler = Upsampler(**upsampler)
        self.head_48k = ISTFTHead(**head_48k)
        self.low_rate, self.cutoff = low_rate, cutoff
        kernel, self._width, self._orig, self._new = resample_kernel(low_rate, self.rate)
        self.register_buffer("resample_kernel", kernel, persistent=False)

    def forward(self, mel: Tensor) -> Tensor:
        """Log-mel (B, n_mels, T) -> 48 kHz audio (B, samples)."""
        features = self.backbone(mel)  # (B, T, C)
        high = self.head_48k(self.upsampler(features.transpose(1, 2)).transpose(1, 2))
        low = resample(self.head(features), self.resample_kernel, self._width, self._orig,
                       self._new)
        return crossover(high[:, :low.shape[1]].float(), low.float(), self.rate, self.cutoff)
