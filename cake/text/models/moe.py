"""The mixture-of-experts MLP shared by the MoE families (Qwen3-MoE, Qwen3.5-MoE): a router
picks each token's top-k experts, the tokens are grouped by expert (one sort), and each
active expert runs once over all of its tokens; an optional shared expert, scaled by a
sigmoid gate, sees every token.

Decoding (one token per row) on CPU takes two kernel calls per layer: the attention half of
the block (decode_attention_block) and every routed expert of the step at once
(moe_experts); routing stays here, in float32, since offloaded experts are loaded by it.

Experts are the shared gated MLP, one per expert, named as the per-expert checkpoints name
them (mlp.experts.E.gate_proj.weight, ...), so each is an ordinary matrix to the loader: kept
in a GGUF's packed blocks, quantized, or dense. Checkpoints with fused expert tensors are
sliced per expert by the checkpoint readers.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from cake.text import quant
from cake.text.models.args import ModelArgs
from cake.text.models.blocks import MLP, TransformerBlock


class Gate(nn.Module):
    """A small dense projection (router logits, the shared expert's gate) that stays in full
    precision: the loader quantizes nn.Linear modules only, and a quantized router could
    change which experts a token goes to."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def expert_args(args: ModelArgs, hidden: int) -> ModelArgs:
    return dataclasses.replace(args, intermediate_size=hidden, mlp_bias=False,
                               fused_checkpoint=False)


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.norm_topk = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = Gate(args.hidden_size, args.num_experts)
        each = expert_args(args, args.moe_intermediate_size)
        self.experts = nn.ModuleList(MLP(each) for _ in range(args.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if args.shared_expert_intermediate_size:
            self.shared_expert = MLP(expert_args(args, args.shared_expert_intermediate_size))
            self.shared_expert_gate = Gate(args.hidden_size, 1)

    def fuse(self) -> None:
        if isinstance(self.experts, nn.ModuleList):  # offloaded experts fuse as they load
            for expert in self.experts:
                expert.fuse()
        if self.shared_expert is not None:
            self.shared_expert.fuse()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each [N, top_k], for tokens x [N, D]."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def prepare_kernel(self) -> None:
        """The resident experts' kernel arguments (offloaded ones are read as they load); a
        shared expert the kernel cannot take (a matrix left unquantized) runs op by op."""
        experts = list(self.experts) if isinstance(self.experts, nn.ModuleList) else []
        args = [expert_kernel_args(m) for m in experts]
        self.kernel_ready = all(a is not None for a in args)
        self.expert_args = args if experts else None
        self.shared_args = (None if self.shared_expert is None
                            else expert_kernel_args(self.shared_expert))

    def decode(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x + the MoE MLP of h (h: x normalized), x and h [B, 1, D]: one kernel call."""
        B, D = x.shape[0], x.shape[-1]
        x2, h2 = x.reshape(B, D), h.reshape(B, D)
        if not getattr(self, "kernel_ready", False) or x.dtype != torch.float32:
            return x + self.forward(h)
        weights, ids = self.route(h2)
        chosen = ids.flatten().tolist()
        local: dict[int, int] = {}  # expert id -> its place in the kernel's lists
        for e in chosen:
            local.setdefault(e, len(local))
        if self.expert_args is not None:
            args = [self.expert_args[e] for e in local]
        else:
            args = [loaded_kernel_args(self.experts[e]) for e in local]
            if any(a is None for a in args):
                return x + self.forward(h)
        rows = torch.arange(B).repeat_interleave(self.top_k)
        pairs = torch.tensor([local[e] for e in chosen])
        weights = weights.flatten()
        if self.shared_expert is not None and self.shared_args is None:
            x2 = x2 + self.shared(h2)
        elif self.shared_expert is not None:
            args.append(self.shared_args)
            rows = torch.cat([rows, torch.arange(B)])
            pairs = torch.cat([pairs, torch.full((B,), len(args) - 1)])
            weights = torch.cat([weights, torch.sigmoid(self.shared_expert_gate(h2)).flatten()])
        gate_up, gate_up_types, down, down_types = zip(*args)
        return torch.ops.cake.moe_experts.default(
            x2, h2, rows, pairs, weights, gate_up, gate_up_types, down, down_types).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.route(x)
        # Sort the (token, choice) pairs by expert: each expert's tokens are then one slice.
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens, scale = order // self.top_k, weights.flatten()[order, None]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = tokens[start:start + n]
                y = self.experts[e](x[rows]) * scale[start:start + n]
                out.index_add_(0, rows, y)
                start += n
        if self.shared_expert is not None:
            out = out + self.shared(x)
        return out.view(shape)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def expert_kernel_args(expert: nn.Module):
    """(gate/up packed, its type, down packed, its type) of a SwiGLU expert whose gate and up
    are one quantized matrix, else None (the expert runs op by op)."""
    gate_up, down = getattr(expert, "gate_up_proj", None), expert.down_proj
    if (expert.act != "silu" or not isinstance(gate_up, quant.QuantLinear)
            or not isinstance(down, quant.QuantLinear)
            or gate_up.bias is not None or down.bias is not None):
        return None
    return gate_up.packed, gate_up.qtype, down.packed, down.qtype


def loaded_kernel_args(expert: nn.Module):
    """expert_kernel_args of an offloaded expert, worked out once per load (kept on it)."""
    args = expert.__dict__.get("kernel_args")
    if args is None:
        args = expert.__dict__["kernel_args"] = expert_kernel_args(expert)
    return args


def attention_kernel_args(block: TransformerBlock):
    """decode_attention_block's weight arguments for a block's attention (its norms before
    and after), or None where a matrix is not quantized."""
    attn = block.self_attn
    qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [
        attn.q_proj, attn.k_proj, attn.v_proj]
    if not all(isinstance(m, quant.QuantLinear) for m in [*qkv, attn.o_proj]):
        return None
    norms = [None if name is None else getattr(block, name) for name in block.norm_names[:2]]
    if attn.q_norm is not None:
        norms += [attn.q_norm, attn.k_norm]
    if any(n is not None and n.weight.dtype != torch.float32 for n in norms):
        return None
    weight = (lambda n: None if n is None else n.weight)  # noqa: E731
    return (weight(norms[0]), weight(norms[1]), [m.packed for m in qkv], [m.qtype for m in qkv],
            quant.joined_bias(qkv), weight(attn.q_norm), weight(attn.k_norm),
            *attn.o_proj.kernel_args(), attn.output_gate)


def decode_attention_half(block: TransformerBlock, x, ropes, batch, cache, layer):
    """x + the block's attention for one new token per row, through decode_attention_block
    when block.attention_args is set, else op by op."""
    if block.attention_args is None:
        h = block.self_attn.decode(block._norm(0, x), ropes, batch, cache, layer)
        return x + block._norm(1, h)
    k_cache, v_cache = cache.buffers(layer, batch.kv_len)
    attn, B = block.self_attn, x.shape[0]
    factor = 1.0 if attn.rope is None else attn.rope.attention_factor
    return torch.ops.cake.decode_attention_block.default(
        x.view(B, -1), *block.attention_args, k_cache, v_cache, batch.slots,
        batch.positions.view(-1), ropes.table(attn.rope), factor, attn.q_scale, attn.n_heads,
        block.window or 0, block.self_attn_eps).view(B, 1, -1)


def prepare_attention_kernel(block: TransformerBlock) -> None:
    block.attention_args = attention_kernel_args(block)
    block.self_attn_eps = next(
        (getattr(block, n).eps for n in block.norm_names if n is not None), 1e-6)


def moe_layer(args: ModelArgs, layer: int) -> bool:
    """Whether a layer's MLP is the sparse one (Qwen3-MoE: every decoder_sparse_step-th layer
    outside mlp_only_layers)."""
    return (args.num_experts > 0 and layer not in args.mlp_only_layers
            and (layer + 1) % args.decoder_sparse_step == 0)


class MoEBlock(TransformerBlock):
    """The decoder block with the sparse MLP; decoding is two kernel calls (attention, then
    the routed experts)."""

    def __init__(self, args: ModelArgs, window, rope):
        super().__init__(args, window, rope)
        self.mlp = SparseMoE(args)
        self.attention_args = None

    def decode(self, x, ropes, batch, cache, layer):
        x = decode_attention_half(self, x, ropes, batch, cache, layer)
        if self.norm_names[3] is not None:  # a norm after the MLP: not in the kernel
            return x + self._norm(3, self.mlp(self._norm(2, x)))
        return self.mlp.decode(x, self._norm(2, x))

    def prepare_kernel(self) -> None:
        self.kernel_args = None
        prepare_attention_kernel(self)
        self.mlp.prepare_kernel()
