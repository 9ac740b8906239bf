"""Rotary position embeddings: the frequency table of each rope variant and how it is applied.

A rope is (inv_freq [rotary_dim / 2], attention_factor): position p turns pair i of the first
rotary_dim channels of a head (rotate-half layout: channel i with i + rotary_dim / 2) by
p * inv_freq[i], and YaRN / longrope also scale cos and sin by attention_factor. The formulas
follow transformers' modeling_rope_utils, which the tests compare against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _base(theta: float, dim: int) -> torch.Tensor:
    # On the CPU even under torch.device("meta"): meta float64 pow would pull in torch's
    # Python decompositions (~800 modules, ~70 MiB resident).
    return theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)


def rope_frequencies(dim: int, theta: float, scaling: Optional[dict],
                     max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [dim / 2], attention_factor) for a rope over `dim` channels."""
    inv = 1.0 / _base(theta, dim)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv.float(), 1.0
    if kind == "linear":
        return (inv / scaling["factor"]).float(), 1.0
    if kind == "llama3":
        return _llama3(inv, scaling).float(), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, max_position_embeddings)
    if kind in ("longrope", "su"):
        return _longrope(dim, theta, scaling, max_position_embeddings)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(is_mid, mid, scaled)


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / orig
    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the channel that turns `rotations` times over orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    channel = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = ((channel - low) / (high - low)).clamp(0, 1)
    pos = _base(theta, dim).float()
    extrapolate = 1 - ramp  # high-frequency channels keep their frequency
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv, float(attn)


def _longrope(dim: int, theta: float, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """Phi-3's longrope: per-channel divisors, the long ones when the model's context exceeds
    its original one (as llama.cpp decides: by context, not by the current length, so the
    cached keys of a sequence all used the same table)."""
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / orig
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = s["long_factor"] if max_pos > orig else s["short_factor"]
    ext = torch.tensor(ext, dtype=torch.float32, device="cpu")
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (ext * theta ** shape), float(attn)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, 1, rotary_dim] cos and sin for the positions [B, T]."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of each head of x [B, T, heads, head_dim]."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
