"""Gated DeltaNet linear attention (Qwen3.5's "linear_attention" layers) and its block.

Each head keeps a state S [key_dim, value_dim]; per token t, with decay a_t = exp(g_t) and
learning rate beta_t:  S <- a_t S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t.
Decoding runs that recurrence (one token, batched over rows and heads: on CPU one kernel
call, deltanet_decode_step, one pass over each state); a prompt runs the
equivalent chunked form, where a chunk's updates become a few matrix products (the WY form:
one unit-triangular solve per chunk) and only the chunk-to-chunk state is sequential.
q, k and v come from one projection through a short causal depthwise convolution, whose
last inputs are the second piece of per-sequence state (cake/text/linear_state.py).

flash-linear-attention's kernels are Triton (GPU only), so this is our own PyTorch code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cake.text import quant
from cake.text.linear_state import states_of
from cake.text.models.args import ModelArgs
from cake.text.models.blocks import TransformerBlock
from cake.text.models.moe import SparseMoE

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def recurrent_delta_rule(q, k, v, g, beta, state):
    """q, k [B, T, H, Dk], v [B, T, H, Dv], g, beta [B, T, H], state [B, H, Dk, Dv] (float32)
    -> (o [B, T, H, Dv], state), one token at a time."""
    out = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        seen = torch.einsum("bhk,bhkv->bhv", k[:, t], state)
        delta = (v[:, t] - seen) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(out, dim=1), state


def chunked_delta_rule(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same as recurrent_delta_rule, a chunk of tokens at a time."""
    B, T, H, Dk = k.shape
    pad = -T % chunk
    # [B, H, chunks, chunk, ...]; padded tokens have k = v = 0 and no decay: they change nothing.
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2).reshape(B, H, -1, chunk, x.shape[-1])
               for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)).transpose(1, 2).reshape(B, H, -1, chunk) for x in (g, beta))
    decay = g.cumsum(-1)  # log of the decay from the chunk's start to each token
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # between[i, j] = exp(decay_i - decay_j) for j <= i, else 0
    between = (decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta[..., None]
    # (I + L) with L the strictly lower part of beta_i k_i.k_j between[i, j]: solving against it
    # turns the chunk's sequential delta updates into matrix products.
    system = (kb @ k.transpose(-1, -2)) * between
    system = system.masked_fill(~causal.tril(-1), 0.0) + torch.eye(chunk, device=q.device)
    values = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False,
                                           unitriangular=True)
    reads = torch.linalg.solve_triangular(system, kb * decay.exp()[..., None], upper=False,
                                          unitriangular=True)
    inner = (q @ k.transpose(-1, -2)) * between
    q_decayed = q * decay.exp()[..., None]
    k_to_end = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]
    out = torch.empty_like(values)
    for c in range(q.shape[2]):
        new = values[:, :, c] - reads[:, :, c] @ state  # what the state does not predict yet
        out[:, :, c] = q_decayed[:, :, c] @ state + inner[:, :, c] @ new
        state = state * chunk_decay[:, :, c] + k_to_end[:, :, c].transpose(-1, -2) @ new
    out = out.reshape(B, H, -1, v.shape[-1])[:, :, :T].transpose(1, 2)
    return out, state


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, times silu of its gate z (weights held as w, not 1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, z):
        f = torch.promote_types(x.dtype, torch.float32)
        normed = F.rms_norm(x.to(f), (x.shape[-1],), None, self.eps).to(x.dtype)
        return (self.weight * normed * F.silu(z.to(f))).to(x.dtype)


class DepthwiseConv(nn.Module):
    """The checkpoint's conv1d: a causal depthwise convolution, weight [channels, 1, kernel]."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        lin = args.linear
        self.k_heads, self.v_heads = lin["key_heads"], lin["value_heads"]
        self.k_dim, self.v_dim, self.kernel = lin["key_dim"], lin["value_dim"], lin["conv_kernel"]
        # v head j reads q/k head j // group (grouped, as the Hub's checkpoints) or
        # j % k_heads (tiled, as llama.cpp's GGUFs reorder them)
        self.tiled = lin.get("value_heads_tiled", False)
        keys, values, dim = self.k_heads * self.k_dim, self.v_heads * self.v_dim, args.hidden_size
        self.channels = 2 * keys + values
        self.in_proj_qkv = nn.Linear(dim, self.channels, bias=False)
        self.in_proj_z = nn.Linear(dim, values, bias=False)
        self.in_proj_b = nn.Linear(dim, self.v_heads, bias=False)
        self.in_proj_a = nn.Linear(dim, self.v_heads, bias=False)
        self.conv1d = DepthwiseConv(self.channels, self.kernel)
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = GatedRMSNorm(self.v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(values, dim, bias=False)
        self.in_proj = None  # the four input projections as one matrix, once fuse() has run
        self.widths = [self.channels, values, self.v_heads, self.v_heads]

    def fuse(self) -> None:
        parts = [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a]
        fused = quant.fuse_linears(parts)
        if fused is not None:
            self.in_proj = fused
            del self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a

    def project(self, x):
        """(qkv, z, b, a) projections of x."""
        if self.in_proj is not None:
            return self.in_proj(x).split(self.widths, dim=-1)
        return (self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x))

    def fresh_state(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(self.channels, self.kernel - 1, device=device, dtype=dtype),
                torch.zeros(self.v_heads, self.k_dim, self.v_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, batch, cache, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        states = states_of(cache)
        f = torch.promote_types(x.dtype, torch.float32)  # the rule and its state: float32 at least
        conv_state, state = states.gather(layer, batch, lambda: self.fresh_state(x.device, f))
        qkv, z, b, a = self.project(x)
        # The convolution sees the sequence's previous kernel-1 inputs before this step's.
        inputs = torch.cat([conv_state.to(x.dtype), qkv.transpose(1, 2)], -1)
        mixed = F.silu(F.conv1d(inputs, self.conv1d.weight, groups=self.channels))
        q, k, v = mixed.transpose(1, 2).split(
            [self.k_heads * self.k_dim, self.k_heads * self.k_dim, self.v_heads * self.v_dim], -1)
        group = self.v_heads // self.k_heads  # each q/k head serves that many v heads
        q, k = (l2norm(t.reshape(B, T, self.k_heads, self.k_dim).to(f)) for t in (q, k))
        if self.tiled:
            q, k = q.repeat(1, 1, group, 1), k.repeat(1, 1, group, 1)
        else:
            q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
        q = q * self.k_dim ** -0.5
        v = v.reshape(B, T, self.v_heads, self.v_dim).to(f)
        beta = torch.sigmoid(b).to(f)
        g = -self.A_log.to(f).exp() * F.softplus(a.to(f) + self.dt_bias.to(f))
        if T == 1 and state.dtype == torch.float32 and quant.available() and x.device.type == "cpu":
            out = torch.ops.cake.deltanet_decode_step(q, k, v, g, beta, state)[:, None]
        else:
            rule = recurrent_delta_rule if T == 1 else chunked_delta_rule
            out, state = rule(q, k, v, g, beta, state)
        states.put(layer, batch, (inputs[..., -(self.kernel - 1):].to(f), state))
        z = z.reshape(B, T, self.v_heads, self.v_dim)
        return self.out_proj(self.norm(out.to(x.dtype), z).reshape(B, T, -1))


class LinearAttentionBlock(TransformerBlock):
    """The decoder block with Gated DeltaNet in attention's place."""

    def __init__(self, args: ModelArgs, mlp: nn.Module = None):
        super().__init__(args, None, None)
        del self.self_attn
        self.linear_attn = GatedDeltaNet(args)
        if mlp is not None:
            self.mlp = mlp

    def forward(self, x, ropes, mask, batch, cache, layer):
        x = x + self.linear_attn(self.input_layernorm(x), batch, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, ropes, batch, cache, layer):
        x = x + self.linear_attn(self.input_layernorm(x), batch, cache, layer)
        if isinstance(self.mlp, SparseMoE):  # the routed experts in one kernel call
            return self.mlp.decode(x, self.post_attention_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))

    def fuse(self) -> None:
        self.linear_attn.fuse()
        self.mlp.fuse()

    def prepare_kernel(self) -> None:
        self.kernel_args = None
        if isinstance(self.mlp, SparseMoE):
            self.mlp.prepare_kernel()
