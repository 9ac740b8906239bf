"""Quantized matrices where our CPU kernels cannot be had (no C++ compiler, not x86, or
CAKE_NO_KERNELS): a GGUF's blocks held in torch's own weight-only layouts, 8 bits or fewer,
never a float copy at 8x the memory.

- Q4_0 and Q4_1 become int4 with a scale and zero point per 32 values
  (_weight_int4pack_mm_for_cpu): the blocks' own integers, as value = (q - 8) * scale + zero.
- Every other type, and embedding tables (whose rows are looked up), becomes int8 with one
  scale per row (_weight_int8pack_mm), requantized from the dequantized blocks: each weight
  moves by at most amax(row) / 254.
Scales and activations are bfloat16 (torch's products run ~10x slower on float32 inputs):
each weight's scale is rounded by at most 2^-9 of itself, each activation likewise.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize
from torch import nn

GROUP = 32  # values per Q4_0 / Q4_1 block, and per int4 scale


class TorchQuantLinear(nn.Module):
    """y = x @ W^T (+ b), W int4 or int8 (see the module's docstring)."""

    def __init__(self, blocks: np.ndarray, qtype, in_features: int,
                 bias: Optional[torch.Tensor] = None, rows: bool = False):
        super().__init__()
        qtype = Q(int(qtype))
        self.qtype, self.in_features, self.out_features = int(qtype), in_features, blocks.shape[0]
        self.int4 = (not rows and qtype in (Q.Q4_0, Q.Q4_1) and self.out_features % 16 == 0)
        if self.int4:
            self._pack_int4(np.ascontiguousarray(blocks), qtype)
        else:
            self._pack_int8(blocks, qtype)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _pack_int8(self, blocks: np.ndarray, qtype: Q, chunk: int = 4096) -> None:
        """Row by row scaled to int8, a chunk of rows dequantized at a time: loading never
        holds a whole float copy (an embedding's would be 4x its int8 table)."""
        N, K = self.out_features, self.in_features
        weight, scale = torch.empty(N, K, dtype=torch.int8), torch.empty(N)
        for r in range(0, N, chunk):
            w = torch.from_numpy(dequantize(blocks[r:r + chunk], qtype).reshape(-1, K))
            s = w.abs().amax(1) / 127
            s[s == 0] = 1.0
            weight[r:r + chunk] = w.div_(s[:, None]).round_().clamp_(-127, 127)
            scale[r:r + chunk] = s
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def _pack_int4(self, blocks: np.ndarray, qtype: Q) -> None:
        """The blocks' own nibbles and scales: d, [m,] 16 bytes holding values i (low nibble)
        and i + 16 (high) of the block."""
        N, K = self.out_features, self.in_features
        raw = blocks.reshape(N, K // GROUP, GGML_QUANT_SIZES[qtype][1])

        def half(at):
            return torch.from_numpy(raw[..., at:at + 2].copy().view(np.float16)[..., 0]).float()

        d = half(0)
        # Q4_0: d * (q - 8); Q4_1: d * q + m = d * (q - 8) + (m + 8d)
        zero = half(2) + 8 * d if qtype == Q.Q4_1 else torch.zeros_like(d)
        qs = raw[..., -16:]
        q = torch.from_numpy(np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(N, K))
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32), 1))
        self.register_buffer("scale", torch.stack([d, zero], -1).transpose(0, 1).contiguous()
                             .to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.int4:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.scale)
        else:
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        y = y.float()  # torch's products are ~10x faster with bfloat16 than float32 inputs
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantized weight (an embedding lookup; int8 tables only)."""
        if self.int4:
            raise ValueError("int4 matrices are not looked up by row")
        return self.weight[ids].float() * self.scale[ids, None].float()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        kind = "int4 per 32" if self.int4 else "int8 per row"
        return (f"in={self.in_features}, out={self.out_features}, {Q(self.qtype).name} as {kind},"
                f" bias={self.bias is not None}")
