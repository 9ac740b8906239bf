"""The mixture-of-experts MLP shared by the MoE families (Qwen3-MoE, Qwen3.5-MoE): a router
picks each token's top-k experts, the tokens are grouped by expert (one sort), and each
active expert runs once over all of its tokens; an optional shared expert, scaled by a
sigmoid gate, sees every token.

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
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


def moe_layer(args: ModelArgs, layer: int) -> bool:
    """Whether a layer's MLP is the sparse one (Qwen3-MoE: every decoder_sparse_step-th layer
    outside mlp_only_layers)."""
    return (args.num_experts > 0 and layer not in args.mlp_only_layers
            and (layer + 1) % args.decoder_sparse_step == 0)


class MoEBlock(TransformerBlock):
    """The decoder block with the sparse MLP; decoding composes the kernels op by op (the
    one-call layer kernel has a dense MLP)."""

    def __init__(self, args: ModelArgs, window, rope):
        super().__init__(args, window, rope)
        self.mlp = SparseMoE(args)

    def prepare_kernel(self) -> None:
        self.kernel_args = None
