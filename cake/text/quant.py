"""Weight-only quantized layers: llama.cpp's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 and Q4_K / Q5_K /
Q6_K blocks kept in memory and multiplied by our CPU kernels (cake/text/kernels), which repack
them once at load time.

A GGUF file's blocks of those types are used as they are; other weights (safetensors, or other
GGUF types such as Q2_K, Q3_K, IQ*) are quantized with the `gguf` package's own quantizer, so
the bytes are what llama.cpp would write. Every layer can give back its dequantized weight, the reference the kernels are
tested against.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from torch import nn

from cake.text import kernels

# --quant targets: types the gguf package can quantize to.
QTYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1,
          "q8_0": GGMLQuantizationType.Q8_0}
KERNEL_TYPES = set(QTYPES.values()) | {
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K}


def available() -> bool:
    """Whether quantized layers can run here (the kernels built and loaded)."""
    return kernels.ops() is not None


def quantize_blocks(weight: torch.Tensor, qtype) -> np.ndarray:
    """[N, K] float weight -> GGUF blocks [N, bytes per row], as llama.cpp quantizes."""
    return quantize(weight.detach().float().cpu().numpy(), GGMLQuantizationType(qtype))


class QuantLinear(nn.Module):
    """y = x @ W^T (+ b) with W held as packed quantized blocks."""

    def __init__(self, blocks: np.ndarray, qtype, in_features: int,
                 bias: Optional[torch.Tensor] = None):
        super().__init__()
        ops = kernels.ops()
        if ops is None:
            raise RuntimeError(f"quantized layers need the CPU kernels: {kernels.error()}")
        self.qtype = int(qtype)
        self.in_features, self.out_features = in_features, blocks.shape[0]
        with warnings.catch_warnings():  # a read-only memory map: repack only reads it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(blocks))
        self.register_buffer("packed", ops.repack(raw, self.qtype))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._qlinear = ops.qlinear.default  # the resolved overload: no lookup per call

    @classmethod
    def from_weight(cls, weight: torch.Tensor, qtype, bias=None) -> "QuantLinear":
        return cls(quantize_blocks(weight, qtype), qtype, weight.shape[1], bias)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, qtype, in_features: int, out_features: int,
                    bias: Optional[torch.Tensor] = None, check: bool = True) -> "QuantLinear":
        """A layer over weights already repacked (by repack, earlier: repack_cache). check:
        the shape now (the kernels check it again at every call; an offloaded expert's load,
        which runs per token, skips this one)."""
        if check:
            torch.ops.cake.dequantize_rows(packed, int(qtype), out_features, in_features,
                                           torch.zeros(0, dtype=torch.long))
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.qtype, layer.in_features, layer.out_features = int(qtype), in_features, out_features
        layer.register_buffer("packed", packed)
        layer.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        layer._qlinear = torch.ops.cake.qlinear.default
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qlinear(x, self.packed, self.qtype, self.out_features, self.bias)

    def kernel_args(self) -> tuple:
        """(packed, type, bias): how the fused kernels take this matrix."""
        return self.packed, self.qtype, self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantized weight [..., in_features] (embedding lookups)."""
        return torch.ops.cake.dequantize_rows(self.packed, self.qtype, self.out_features,
                                              self.in_features, ids)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))

    def extra_repr(self) -> str:
        name = GGMLQuantizationType(self.qtype).name
        return f"in={self.in_features}, out={self.out_features}, {name}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """An embedding table of quantized rows; as a tied head it is also a QuantLinear."""

    def __init__(self, blocks: np.ndarray, qtype, dim: int, dtype=torch.float32):
        super().__init__()
        self.table = QuantLinear(blocks, qtype, dim)
        self.num_embeddings, self.embedding_dim, self.dtype = blocks.shape[0], dim, dtype

    @classmethod
    def from_table(cls, table: QuantLinear, dtype=torch.float32) -> "QuantEmbedding":
        emb = cls.__new__(cls)
        nn.Module.__init__(emb)
        emb.table = table
        emb.num_embeddings, emb.embedding_dim, emb.dtype = table.out_features, table.in_features, dtype
        return emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids).to(self.dtype)


def fuse_linears(layers: Sequence[nn.Module]) -> Optional[nn.Module]:
    """One layer computing the concatenated outputs of `layers` (same input), or None when
    they cannot be joined (mixed quant types)."""
    if all(type(m) is nn.Linear for m in layers):
        has_bias = [m.bias is not None for m in layers]
        # Made on the meta device: a real one would draw its random init from (and so shift)
        # the global generator that seeded requests rely on, and take time for nothing.
        fused = nn.Linear(layers[0].in_features, sum(m.out_features for m in layers),
                          bias=any(has_bias), device="meta")
        with torch.no_grad():
            fused.weight = nn.Parameter(torch.cat([m.weight for m in layers]),
                                        requires_grad=False)
            if any(has_bias):
                fused.bias = nn.Parameter(torch.cat(
                    [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                     for m in layers]), requires_grad=False)
        return fused
    if all(isinstance(m, QuantLinear) for m in layers) and len({m.qtype for m in layers}) == 1:
        # Packed groups concatenate when no layer ends in a padded (partial) group.
        first = layers[0]
        if any(m.packed.shape[0] * rows_per_group() != m.out_features for m in layers):
            return None
        fused = QuantLinear.__new__(QuantLinear)
        nn.Module.__init__(fused)
        fused.qtype, fused.in_features = first.qtype, first.in_features
        fused.out_features = sum(m.out_features for m in layers)
        parts = [m.packed for m in layers]
        joined = _adjacent(parts)
        fused.register_buffer("packed", torch.cat(parts) if joined is None else joined)
        fused.register_buffer("bias", joined_bias(layers))
        fused._qlinear = first._qlinear
        return fused
    return None


def joined_bias(layers: Sequence[nn.Module]) -> Optional[torch.Tensor]:
    """The biases of layers side by side (zeros where one has none), None if none has one."""
    if all(m.bias is None for m in layers):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features)
                      for m in layers])


def _adjacent(parts: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The parts as one tensor without a copy, when they lie one after the other in one
    storage (weights mapped from repack_cache), else None."""
    first = parts[0]
    for a, b in zip(parts, parts[1:]):
        if (b.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or b.data_ptr() != a.data_ptr() + a.numel() or b.shape[1] != first.shape[1]):
            return None
    return first.as_strided((sum(p.shape[0] for p in parts), first.shape[1]), (first.shape[1], 1))


def rows_per_group() -> int:
    return int(torch.ops.cake.rows_per_group())


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused [..., 2F] gate/up output."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and available():
        return torch.ops.cake.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
