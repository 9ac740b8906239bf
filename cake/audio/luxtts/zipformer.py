"""The TTS Zipformer of ZipVoice, for inference: a U-Net of encoder stacks at frame rates
1, 1/2, 1/4, ..., each layer sharing one set of relative-position attention weights between a
non-linear attention, two self-attentions and two depthwise convolutions, with learnt bypass
scales. Parameter names follow k2-fsa's checkpoints so their state dicts load as they are.
Tensors inside are time-major (T, B, C), as in the original."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def swoosh_l(x: Tensor) -> Tensor:
    return F.softplus(x - 4.0, beta=1.0, threshold=1e9) - 0.08 * x - 0.035


def swoosh_r(x: Tensor) -> Tensor:
    return F.softplus(x - 1.0, beta=1.0, threshold=1e9) - 0.08 * x - 0.313261687


class SwooshR(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return swoosh_r(x)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t (N,) -> (N, dim): cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class BiasNorm(nn.Module):
    """x scaled by the inverse RMS of (x - bias), times exp(log_scale)."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * (torch.mean((x - self.bias) ** 2, dim=-1, keepdim=True) ** -0.5
                    * self.log_scale.exp())


class ActivationLinear(nn.Module):
    """Swoosh activation then a linear layer (the checkpoint keeps weight/bias at this level)."""

    def __init__(self, dim_in: int, dim_out: int, activation):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in))
        self.bias = nn.Parameter(torch.empty(dim_out))
        self.activation = activation
        nn.init.normal_(self.weight, std=dim_in ** -0.5)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.activation(x), self.weight, self.bias)


class Bypass(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, orig: Tensor, x: Tensor) -> Tensor:
        return orig + (x - orig) * self.bypass_scale


def relative_position_table(length: int, dim: int, device) -> Tensor:
    """The compact relative positional encoding of offsets -(length-1) .. length-1:
    (2*length-1, dim). Offsets are log-compressed, squashed with atan, then Fourier-encoded;
    the last channel is a constant 1 (a bias)."""
    x = torch.arange(-(length - 1), length, device=device, dtype=torch.float32)[:, None]
    freqs = 1 + torch.arange(dim // 2, device=device)
    c = dim ** 0.5
    compressed = c * x.sign() * ((x.abs() + c).log() - math.log(c))
    angle = (compressed / (dim / (2.0 * math.pi))).atan()
    pe = torch.zeros(x.shape[0], dim, device=device)
    pe[:, 0::2] = (angle * freqs).cos()
    pe[:, 1::2] = (angle * freqs).sin()
    pe[:, -1] = 1.0
    return pe


class AttentionWeights(nn.Module):
    """Multi-head attention weights with relative-position scores: (heads, B, T, T)."""

    def __init__(self, dim: int, pos_dim: int, heads: int, query_dim: int, pos_head_dim: int):
        super().__init__()
        self.heads, self.query_dim, self.pos_head_dim = heads, query_dim, pos_head_dim
        self.in_proj = nn.Linear(dim, (2 * query_dim + pos_head_dim) * heads)
        self.linear_pos = nn.Linear(pos_dim, heads * pos_head_dim, bias=False)

    def forward(self, x: Tensor, pos_emb: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        T, B, _ = x.shape
        h, d = self.heads, self.query_dim
        x = self.in_proj(x)
        q = x[..., :h * d].reshape(T, B, h, d).permute(2, 1, 0, 3)
        k = x[..., h * d:2 * h * d].reshape(T, B, h, d).permute(2, 1, 3, 0)
        p = x[..., 2 * h * d:].reshape(T, B, h, self.pos_head_dim).permute(2, 1, 0, 3)
        scores = torch.matmul(q, k)
        pos = self.linear_pos(pos_emb).reshape(-1, 2 * T - 1, h, self.pos_head_dim)
        pos_scores = torch.matmul(p, pos.permute(2, 0, 3, 1))  # (h, B, T, 2T-1)
        # row i needs offsets j-i for j in 0..T-1, columns T-1-i .. 2T-2-i of the table: a
        # strided view whose row step is one column less than a full row
        s0, s1, s2, s3 = pos_scores.stride()
        scores = scores + pos_scores.as_strided((h, pos_scores.shape[1], T, T),
                                                (s0, s1, s2 - s3, s3), s3 * (T - 1))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], -1000.0)
        return scores.softmax(dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, value_dim: int):
        super().__init__()
        self.in_proj = nn.Linear(dim, heads * value_dim)
        self.out_proj = nn.Linear(heads * value_dim, dim)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        T, B, _ = x.shape
        v = self.in_proj(x).reshape(T, B, weights.shape[0], -1).permute(2, 1, 0, 3)
        out = torch.matmul(weights, v).permute(2, 1, 0, 3).reshape(T, B, -1)
        return self.out_proj(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.in_proj = nn.Linear(dim, hidden)
        self.out_proj = ActivationLinear(hidden, dim, swoosh_l)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.in_proj(x))


class NonlinAttention(nn.Module):
    """tanh-gated values mixed by the first head's attention weights, then gated again."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.in_proj = nn.Linear(dim, 3 * hidden)
        self.out_proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        T, B, _ = x.shape
        s, v, y = self.in_proj(x).chunk(3, dim=2)
        v = v * torch.tanh(s)
        heads = weights.shape[0]
        v = v.reshape(T, B, heads, -1).permute(2, 1, 0, 3)
        v = torch.matmul(weights, v).permute(2, 1, 0, 3).reshape(T, B, -1)
        return self.out_proj(v * y)


class ConvModule(nn.Module):
    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.out_proj = ActivationLinear(dim, dim, swoosh_r)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        x, s = self.in_proj(x).chunk(2, dim=2)
        x = (x * torch.sigmoid(s)).permute(1, 2, 0)  # (B, C, T)
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask[:, None, :], 0.0)
        return self.out_proj(self.depthwise_conv(x).permute(2, 0, 1))


class ZipformerLayer(nn.Module):
    def __init__(self, dim: int, pos_dim: int, heads: int, query_dim: int, pos_head_dim: int,
                 value_dim: int, ff_dim: int, kernel: int):
        super().__init__()
        self.bypass, self.bypass_mid = Bypass(dim), Bypass(dim)
        self.self_attn_weights = AttentionWeights(dim, pos_dim, heads, query_dim, pos_head_dim)
        self.self_attn1 = SelfAttention(dim, heads, value_dim)
        self.self_attn2 = SelfAttention(dim, heads, value_dim)
        self.feed_forward1 = FeedForward(dim, ff_dim * 3 // 4)
        self.feed_forward2 = FeedForward(dim, ff_dim)
        self.feed_forward3 = FeedForward(dim, ff_dim * 5 // 4)
        self.nonlin_attention = NonlinAttention(dim, 3 * dim // 4)
        self.conv_module1 = ConvModule(dim, kernel)
        self.conv_module2 = ConvModule(dim, kernel)
        self.norm = BiasNorm(dim)

    def forward(self, src: Tensor, pos_emb: Tensor, time_emb: Optional[Tensor],
                mask: Optional[Tensor]) -> Tensor:
        orig = src
        weights = self.self_attn_weights(src, pos_emb, mask)
        if time_emb is not None:
            src = src + time_emb
        src = src + self.feed_forward1(src)
        src = src + self.nonlin_attention(src, weights[0:1])
        src = src + self.self_attn1(src, weights)
        if time_emb is not None:
            src = src + time_emb
        src = src + self.conv_module1(src, mask)
        src = src + self.feed_forward2(src)
        src = self.bypass_mid(orig, src)
        src = src + self.self_attn2(src, weights)
        if time_emb is not None:
            src = src + time_emb
        src = src + self.conv_module2(src, mask)
        src = src + self.feed_forward3(src)
        return self.bypass(orig, self.norm(src))


class ZipformerStack(nn.Module):
    """Layers at one frame rate, sharing a positional encoding and a time projection."""

    def __init__(self, layers: int, dim: int, time_dim: Optional[int], pos_dim: int, **layer):
        super().__init__()
        self.pos_dim = pos_dim
        self.time_emb = (nn.Sequential(SwooshR(), nn.Linear(time_dim, dim))
                         if time_dim is not None else None)
        self.layers = nn.ModuleList(ZipformerLayer(dim, pos_dim, **layer)
                                    for _ in range(layers))

    def forward(self, x: Tensor, time_emb: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
        pos_emb = relative_position_table(x.shape[0], self.pos_dim, x.device).to(x.dtype)[None]
        if self.time_emb is not None:
            time_emb = self.time_emb(time_emb)
        for layer in self.layers:
            x = layer(x, pos_emb, time_emb, mask)
        return x


class Downsample(nn.Module):
    """A softmax-weighted sum of each `factor` frames (the last frame repeats to fill)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.bias = nn.Parameter(torch.zeros(factor))

    def forward(self, x: Tensor) -> Tensor:
        T, B, C = x.shape
        n = (T + self.factor - 1) // self.factor
        x = torch.cat([x, x[-1:].expand(n * self.factor - T, B, C)])
        x = x.reshape(n, self.factor, B, C)
        return (x * self.bias.softmax(0)[:, None, None]).sum(1)


class DownsampledStack(nn.Module):
    def __init__(self, stack: ZipformerStack, dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.downsample = Downsample(factor)
        self.encoder = stack
        self.out_combiner = Bypass(dim)

    def forward(self, x: Tensor, time_emb: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
        if mask is not None:
            mask = mask[..., ::self.factor]
        y = self.encoder(self.downsample(x), time_emb, mask)
        y = y.repeat_interleave(self.factor, dim=0)[:x.shape[0]]
        return self.out_combiner(x, y)


def _per_stack(value, n: int) -> list:
    value = [value] if isinstance(value, int) else list(value)
    return value * n if len(value) == 1 else value


class TTSZipformer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, downsampling_factor, num_encoder_layers,
                 cnn_module_kernel, encoder_dim: int, query_head_dim: int, pos_head_dim: int,
                 value_head_dim: int, num_heads: int, feedforward_dim: int, pos_dim: int,
                 time_embed_dim: Optional[int] = None, guidance_embed: bool = False,
                 guidance_scale_embed_dim: int = 192):
        super().__init__()
        factors = _per_stack(downsampling_factor, 1)
        layers = _per_stack(num_encoder_layers, len(factors))
        kernels = _per_stack(cnn_module_kernel, len(factors))
        self.time_embed_dim, self.guidance_dim = time_embed_dim, guidance_scale_embed_dim
        self.in_proj = nn.Linear(in_dim, encoder_dim)
        self.out_proj = nn.Linear(encoder_dim, out_dim)
        stacks = []
        for factor, n, kernel in zip(factors, layers, kernels):
            stack = ZipformerStack(n, encoder_dim, time_embed_dim, pos_dim, heads=num_heads,
                                   query_dim=query_head_dim, pos_head_dim=pos_head_dim,
                                   value_dim=value_head_dim, ff_dim=feedforward_dim,
                                   kernel=kernel)
            stacks.append(stack if factor == 1 else DownsampledStack(stack, encoder_dim, factor))
        self.encoders = nn.ModuleList(stacks)
        self.time_embed = None
        if time_embed_dim is not None:
            self.time_embed = nn.Sequential(nn.Linear(time_embed_dim, 2 * time_embed_dim),
                                            SwooshR(),
                                            nn.Linear(2 * time_embed_dim, time_embed_dim))
        self.guidance_scale_embed = (nn.Linear(guidance_scale_embed_dim, time_embed_dim,
                                               bias=False) if guidance_embed else None)

    def forward(self, x: Tensor, t: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                guidance_scale: Optional[Tensor] = None) -> Tensor:
        """x (B, T, in_dim), t and guidance_scale (B,), padding_mask (B, T) True at padding
        -> (B, T, out_dim)."""
        x = self.in_proj(x.permute(1, 0, 2))
        time_emb = None
        if self.time_embed is not None:
            time_emb = timestep_embedding(t, self.time_embed_dim)
            if self.guidance_scale_embed is not None:
                time_emb = time_emb + self.guidance_scale_embed(
                    timestep_embedding(guidance_scale, self.guidance_dim))
            time_emb = self.time_embed(time_emb)
        for stack in self.encoders:
            x = stack(x, time_emb, padding_mask)
        return self.out_proj(x).permute(1, 0, 2)
