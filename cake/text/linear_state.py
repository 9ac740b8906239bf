"""Per-sequence state of linear-attention layers (Gated DeltaNet), kept beside the KV cache.

Where attention keeps every position's keys and values, a linear-attention layer keeps two
fixed-size tensors per sequence: the last kernel-1 inputs of its causal convolution and its
recurrent state [heads, key_dim, value_dim]. A step gathers the states of its rows into one
batch, the layer advances them, and the step puts them back.

A row whose first position is 0 starts from zeros: a new sequence in a reused slot, or a
cluster replaying a sequence from its prompt, rebuilds its state from the tokens alone (so a
stage whose master never tells it of releases stays correct). Since the state summarizes a
whole prefix, a cached KV prefix cannot be reused by a model with such layers.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

from cake.text.kv_cache import StepBatch


def sequence_keys(batch: StepBatch) -> list[int]:
    """Each row's sequence: its slot, or the first block of its table (a sequence of such a
    model shares no block with another: no prefix reuse, no forks)."""
    return [first for first, _ in batch.rows()]


class LinearStates:
    def __init__(self):
        self._layers: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}  # layer -> slot -> state

    def gather(self, layer: int, batch: StepBatch,
               zeros: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The states of the batch's rows, stacked [B, ...]; zeros() makes one fresh state."""
        held = self._layers.setdefault(layer, {})
        rows = []
        for slot, first in zip(sequence_keys(batch), batch.positions[:, 0].tolist()):
            rows.append(held.get(slot) if first > 0 and slot in held else zeros())
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def put(self, layer: int, batch: StepBatch, states: tuple[torch.Tensor, ...]) -> None:
        held = self._layers[layer]
        for b, slot in enumerate(sequence_keys(batch)):
            held[slot] = tuple(s[b] for s in states)

    def release(self, slot: int) -> None:
        for held in self._layers.values():
            held.pop(slot, None)

    def held_bytes(self) -> int:
        return sum(s.numel() * s.element_size()
                   for held in self._layers.values() for state in held.values() for s in state)


# One store per KV cache: the cache is what a stage is handed for a sequence's memory.
_STATES: "weakref.WeakKeyDictionary[object, LinearStates]" = weakref.WeakKeyDictionary()


def states_of(cache) -> LinearStates:
    if cache not in _STATES:
        _STATES[cache] = LinearStates()
    return _STATES[cache]
