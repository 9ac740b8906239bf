"""A preallocated KV cache with one slot per running sequence.

Each layer owns a key and a value tensor of shape [slots, max_len, n_kv_heads, head_dim].
A sequence keeps its slot for its whole life; position p of the sequence lives at index p,
so a step of any mix of sequences (a batch of decodes, a prefill chunk) is one scatter and
one gather per layer, and attention masks come from positions alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class StepBatch:
    """What every stage needs to run one step: where each row's tokens sit.

    positions: [B, T] position of each token (also its index in the slot).
    slots: [B] the cache slot of each row.
    kv_len: how many cache positions the step attends over (max position + 1).
    span: (slot, first position) when the step is one row of consecutive positions, which
        the cache then writes and reads as plain slices, with no index tensors and no reads
        of device tensors from the host.
    """

    positions: torch.Tensor
    slots: torch.Tensor
    kv_len: int
    span: Optional[tuple[int, int]] = None

    @classmethod
    def make(cls, positions: list[list[int]], slots: list[int], device) -> "StepBatch":
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        span = None
        if len(slots) == 1:
            p0 = positions[0][0]
            if list(positions[0]) == list(range(p0, p0 + len(positions[0]))):
                span = (slots[0], p0)
        return cls(pos, torch.tensor(slots, dtype=torch.long, device=device),
                   max(max(p) for p in positions) + 1, span)


class KVCache:
    """Capacity grows by doubling up to max_len as sequences get longer, so memory follows
    the longest live sequence rather than the model's whole context times the slots."""

    def __init__(self, layers: range, num_slots: int, max_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, initial_len: int = 256):
        shape = (num_slots, min(max_len, initial_len), n_kv_heads, head_dim)
        self.max_len, self.num_slots = max_len, num_slots
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    def _reserve(self, layer: int, length: int) -> None:
        old = self.k[layer]
        if length <= old.shape[1]:
            return
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is past the context ({self.max_len})")
        cap = min(self.max_len, max(length, 2 * old.shape[1]))
        for store in (self.k, self.v):
            grown = store[layer].new_zeros((old.shape[0], cap, *old.shape[2:]))
            grown[:, :old.shape[1]] = store[layer]
            store[layer] = grown

    def bytes_per_token(self) -> int:
        t = next(iter(self.k.values()))
        return 2 * len(self.k) * t.shape[2] * t.shape[3] * t.element_size()

    def update(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, T, n_kv, head_dim] at the batch positions and return the keys and
        values [B, kv_len, n_kv, head_dim] the step attends over."""
        L = batch.kv_len
        self._reserve(layer, L)
        kc, vc = self.k[layer], self.v[layer]
        if batch.span is not None:
            s, p0 = batch.span
            T = k.shape[1]
            kc[s, p0:p0 + T] = k[0]
            vc[s, p0:p0 + T] = v[0]
            return kc[s:s + 1, :L], vc[s:s + 1, :L]
        rows = batch.slots[:, None]
        kc[rows, batch.positions] = k
        vc[rows, batch.positions] = v
        return kc[batch.slots, :L], vc[batch.slots, :L]
