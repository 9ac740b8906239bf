"""A preallocated KV cache with one slot per running sequence.

Each layer owns a key and a value tensor of shape [slots, max_len, n_kv_heads, head_dim].
A sequence keeps its slot for its whole life; position p of the sequence lives at index p,
so a step of any mix of sequences (a batch of decodes, a prefill chunk) is one scatter and
one gather per layer, and attention masks come from positions alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepBatch:
    """What every stage needs to run one step: where each row's tokens sit.

    positions: [B, T] position of each token (also its index in the slot).
    slots: [B] the cache slot of each row.
    kv_len: how many cache positions the step attends over (max position + 1).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    kv_len: int

    @classmethod
    def make(cls, positions: list[list[int]], slots: list[int], device) -> "StepBatch":
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        return cls(pos, torch.tensor(slots, dtype=torch.long, device=device),
                   max(max(p) for p in positions) + 1)


class KVCache:
    def __init__(self, layers: range, num_slots: int, max_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        shape = (num_slots, max_len, n_kv_heads, head_dim)
        self.max_len, self.num_slots = max_len, num_slots
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    def update(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, T, n_kv, head_dim] at the batch positions and return the keys and
        values [B, kv_len, n_kv, head_dim] the step attends over."""
        kc, vc = self.k[layer], self.v[layer]
        L = batch.kv_len
        if batch.slots.shape[0] == 1:
            # One sequence: contiguous slices, no index tensors, no copies on read.
            s = int(batch.slots[0])
            p0 = int(batch.positions[0, 0])
            T = k.shape[1]
            kc[s, p0:p0 + T] = k[0]
            vc[s, p0:p0 + T] = v[0]
            return kc[s:s + 1, :L], vc[s:s + 1, :L]
        rows = batch.slots[:, None]
        kc[rows, batch.positions] = k
        vc[rows, batch.positions] = v
        return kc[batch.slots, :L], vc[batch.slots, :L]
