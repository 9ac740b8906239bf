"""The pieces every decoder family is built from: RMSNorm, GQA attention (optional q/k norm per
head or over the whole projection, sliding window, rope variant or none, score scale), the
gated MLP (SwiGLU or GeGLU) and the decoder block with its norm layout (pre, post or both).

Decoding one token per row on CPU goes through our kernels: the whole block in one call
(decode_layer) when its matrices are quantized, otherwise composed from the matrix kernel
(qlinear, in QuantLinear) and decode_attention, with any rope the kernel lacks applied here
first and the kernel given a zero table (so it does not rotate).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cake.text import quant
from cake.text.kv_cache import KVCache, StepBatch
from cake.text.models.args import ModelArgs
from cake.text.models.rope import apply_rope


class RMSNorm(nn.Module):
    """Gemma's (1 + w) form is the same with 1 added to w when it is loaded."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rope:
    """How a layer rotates q and k: its frequency table (a buffer of the model, by name), the
    channels it covers and the cos/sin scale. A NoPE layer has none."""

    def __init__(self, table: str, rotary_dim: int, attention_factor: float, head_dim: int):
        self.table, self.rotary_dim, self.attention_factor = table, rotary_dim, attention_factor
        # The decode kernel rotates all head_dim channels with factor 1; else we rotate here.
        self.in_kernel = rotary_dim == head_dim and attention_factor == 1.0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: Optional[int], rope: Optional[Rope]):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        self.window, self.rope = window, rope
        dim, qkv_bias = args.hidden_size, args.qkv_bias or args.attention_bias
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # Qwen3.5: q_proj also yields, per head, a gate on the attention output (sigmoid).
        self.output_gate = args.attn_output_gate
        self.q_width = 2 * q if self.output_gate else q
        self.q_proj = self.k_proj = self.v_proj = None
        if args.fused_checkpoint:
            self.qkv_proj = nn.Linear(dim, q + 2 * kv, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, self.q_width, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, kv, bias=qkv_bias)
            self.qkv_proj = None  # q, k and v as one matrix, once fuse() has run
        self.o_proj = nn.Linear(q, dim, bias=args.attention_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm:
            per = args.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per else q, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per else kv, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        scalar = args.query_pre_attn_scalar or self.head_dim
        self.scale = scalar ** -0.5
        # The kernel scales scores by head_dim^-1/2: other scales go into q.
        self.q_scale = 1.0 if scalar == self.head_dim else math.sqrt(self.head_dim / scalar)

    def fuse(self) -> None:
        """One matrix product for q, k and v instead of three."""
        if self.qkv_proj is not None:
            return
        fused = quant.fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def project(self, x):
        """q, k, v: [B, T, heads, head_dim] each, q and k normalized but not rotated, and the
        output gate [B, T, heads * head_dim] (None without one)."""
        B, T, _ = x.shape
        gate = None
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(
                [self.q_width, self.n_kv * self.head_dim,
                 self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.output_gate:
            q, gate = q.view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(B, T, -1)
        if self.qk_norm == "proj":  # OLMo 2: over the whole projection, before the heads split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, gate

    def output(self, out: torch.Tensor, gate) -> torch.Tensor:
        """o_proj of the heads' outputs [B, T, heads * head_dim], gated where q_proj said."""
        return self.o_proj(out if gate is None else out * torch.sigmoid(gate))

    def decode(self, x, ropes: dict, batch: StepBatch, cache: KVCache, layer: int):
        """One new token per row through our CPU kernel: cache write and attention over each
        row's own slot in one call (no gather of other rows' caches, no mask)."""
        B = x.shape[0]
        rope = self.rope
        plain = (self.qkv_proj is not None and self.qk_norm is None and self.q_scale == 1.0
                 and (rope is None or rope.in_kernel) and not self.output_gate)
        gate = None
        if plain:
            qkv = self.qkv_proj(x).view(B, -1)
        else:
            q, k, v, gate = self.project(x)
            if rope is not None and not rope.in_kernel:
                cos, sin = ropes.cos_sin(rope)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.q_scale != 1.0:
                q = q * self.q_scale
            qkv = torch.cat([t.reshape(B, -1) for t in (q, k, v)], dim=-1)
        k_cache, v_cache = cache.buffers(layer, batch.kv_len)
        table = ropes.table(rope if rope is not None and rope.in_kernel else None)
        out = torch.ops.cake.decode_attention(qkv, k_cache, v_cache, batch.slots,
                                              batch.positions, table, self.n_heads,
                                              self.window or 0)
        return self.output(out.view(B, 1, -1), gate)

    def forward(self, x, ropes: dict, mask, batch: StepBatch, cache: KVCache, layer: int):
        B, T, _ = x.shape
        q, k, v, gate = self.project(x)
        if self.rope is not None:
            cos, sin = ropes.cos_sin(self.rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.update(layer, batch, k, v)  # [B, L, n_kv, head_dim]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a float16 cache of a float32 model
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask, scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
        return self.output(out.transpose(1, 2).reshape(B, T, -1), gate)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (tanh-approximated gelu)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        if args.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {args.hidden_act!r}")
        self.act = args.hidden_act
        self.gate_proj = self.up_proj = None
        if args.fused_checkpoint:
            self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=bias)
        else:
            self.gate_proj = nn.Linear(dim, hidden, bias=bias)
            self.up_proj = nn.Linear(dim, hidden, bias=bias)
            self.gate_up_proj = None  # gate and up as one matrix, once fuse() has run
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def fuse(self) -> None:
        if self.gate_up_proj is not None:
            return
        fused = quant.fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            gu = self.gate_up_proj(x)
            if self.act == "silu":
                return self.down_proj(quant.silu_mul(gu))
            gate, up = gu.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act == "silu":
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


# Norm layouts -> the checkpoint names of (before attention, after attention, before the MLP,
# after the MLP); None where the layout has no norm there.
NORM_LAYOUTS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
}


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, window: Optional[int], rope: Optional[Rope]):
        super().__init__()
        self.window = window
        self.self_attn = Attention(args, window, rope)
        self.mlp = MLP(args)
        self.norm_names = NORM_LAYOUTS[args.norms]
        for name in self.norm_names:
            if name:
                setattr(self, name, RMSNorm(args.hidden_size, args.rms_norm_eps))
        self.kernel_args = None

    def fuse(self) -> None:
        self.self_attn.fuse()
        self.mlp.fuse()

    def _norm(self, where: int, x):
        name = self.norm_names[where]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x, ropes, mask, batch, cache, layer):
        h = self.self_attn(self._norm(0, x), ropes, mask, batch, cache, layer)
        x = x + self._norm(1, h)
        return x + self._norm(3, self.mlp(self._norm(2, x)))

    def decode(self, x, ropes, batch, cache, layer):
        """One new token per row, x [B, 1, dim], through our CPU kernels."""
        if self.kernel_args is None:
            h = self.self_attn.decode(self._norm(0, x), ropes, batch, cache, layer)
            x = x + self._norm(1, h)
            return x + self._norm(3, self.mlp(self._norm(2, x)))
        k_cache, v_cache = cache.buffers(layer, batch.kv_len)
        attn, B = self.self_attn, x.shape[0]
        factor = 1.0 if attn.rope is None else attn.rope.attention_factor
        return self._decode_layer(x.view(B, -1), *self.kernel_args, k_cache, v_cache,
                                  batch.slots, batch.positions.view(-1), ropes.table(attn.rope),
                                  factor, attn.q_scale, attn.n_heads, self.window or 0,
                                  self.eps).view(B, 1, -1)

    def prepare_kernel(self) -> None:
        """Arguments of the one-call decoder layer kernel (any norm layout, q/k norm, rope and
        MLP kind of the shared blocks), when every matrix is quantized; else decoding goes op
        by op."""
        attn, mlp = self.self_attn, self.mlp
        qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [
            attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [
            mlp.gate_proj, mlp.up_proj]
        self.kernel_args = None
        if attn.output_gate or not all(isinstance(m, quant.QuantLinear)  # (gate: not in it)
                                       for m in [*qkv, attn.o_proj, *gate_up, mlp.down_proj]):
            return
        norms = [None if name is None else getattr(self, name) for name in self.norm_names]
        if attn.q_norm is not None:
            norms += [attn.q_norm, attn.k_norm]
        if any(n is not None and n.weight.dtype != torch.float32 for n in norms):
            return
        weight = (lambda n: None if n is None else n.weight)  # noqa: E731

        def parts(mats):
            return ([m.packed for m in mats], [m.qtype for m in mats], quant.joined_bias(mats))

        self.kernel_args = (
            *[weight(n) for n in norms[:4]], *parts(qkv), weight(attn.q_norm),
            weight(attn.k_norm), *attn.o_proj.kernel_args(), *parts(gate_up),
            mlp.act != "silu", *mlp.down_proj.kernel_args())
        self.eps = next(n for n in norms if n is not None).eps
        self._decode_layer = torch.ops.cake.decode_layer.default
