"""A preallocated KV cache with one slot per running sequence.

Each layer owns a key and a value tensor of shape [slots, max_len, n_kv_heads, head_dim].
A sequence keeps its slot for its whole life; position p of the sequence lives at index p,
so a step of any mix of sequences (a batch of decodes, a prefill chunk) is one scatter and
one gather per layer, and attention masks come from positions alone.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import mmap
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
    first_slot: Optional[int] = None  # when the rows' slots are first_slot, first_slot + 1, ...
    newest: Optional[list[tuple[int, int]]] = None  # (slot, newest position) per row

    def rows(self) -> list[tuple[int, int]]:
        """(slot, newest position) of each row, from the host lists when make() had them."""
        if self.newest is None:
            self.newest = list(zip(self.slots.tolist(), self.positions.amax(1).tolist()))
        return self.newest

    @classmethod
    def make(cls, positions: list[list[int]], slots: list[int], device) -> "StepBatch":
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        span = None
        if len(slots) == 1:
            p0 = positions[0][0]
            if list(positions[0]) == list(range(p0, p0 + len(positions[0]))):
                span = (slots[0], p0)
        first = slots[0] if list(slots) == list(range(slots[0], slots[0] + len(slots))) else None
        return cls(pos, torch.tensor(slots, dtype=torch.long, device=device),
                   max(max(p) for p in positions) + 1, span, first,
                   [(s, max(p)) for s, p in zip(slots, positions)])


def lazy_zeros(shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A zero CPU tensor whose pages the OS maps only when written (an anonymous mapping), so
    a cache sized for the whole context costs memory only for the positions sequences reach,
    and the mapping, to give pages back. Huge pages are declined: one written position would
    otherwise cost 2 MiB."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    pages = mmap.mmap(-1, max(nbytes, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8)[:nbytes].view(dtype).view(shape), pages


def serving_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """What a server's cache stores for a model computing in `dtype`: on CPU, float32 models
    keep keys and values in float16 (as llama.cpp does), half the memory for ~1e-3 relative
    rounding of keys and values; the decode kernel reads either."""
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        return torch.float16
    return dtype


def kv_row_bytes(n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def sequence_kv_bytes(windows, row_bytes: int, length: int) -> int:
    """Keys and values of one sequence of `length` positions over layers with these sliding
    windows (None: global): a sliding layer holds at most its window of positions.
    row_bytes: one position's key and value in one layer."""
    return row_bytes * sum(min(length, w or length) for w in windows)


class KVCache:
    """Memory follows the longest live sequence rather than the model's whole context times
    the slots: on CPU the whole context is reserved but paged in only where written; on other
    devices (or with initial_len) capacity grows by doubling up to max_len."""

    def __init__(self, layers: range, num_slots: int, max_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, initial_len: Optional[int] = None,
                 windows: Optional[dict[int, Optional[int]]] = None):
        """dtype: what keys and values are stored as (see serving_dtype). windows: layer ->
        sliding window (None: global), for counting what the cache holds."""
        self.max_len, self.num_slots, self.dtype = max_len, num_slots, dtype
        self.windows = {i: (windows or {}).get(i) for i in layers}
        self._row = kv_row_bytes(n_kv_heads, head_dim, dtype)
        self._lengths: dict[int, int] = {}  # slot -> positions its sequence has
        self._maps: dict[int, tuple] = {}  # layer -> the k and v mappings (lazy CPU caches)
        self._forgotten: dict[tuple[int, int], int] = {}  # (layer, slot) -> bytes given back
        if initial_len is None and torch.device(device).type == "cpu":
            shape = (num_slots, max_len, n_kv_heads, head_dim)
            self.k, self.v = {}, {}
            for i in layers:
                (self.k[i], km), (self.v[i], vm) = (lazy_zeros(shape, dtype),
                                                    lazy_zeros(shape, dtype))
                self._maps[i] = (km, vm)
            return
        shape = (num_slots, min(max_len, initial_len or 256), n_kv_heads, head_dim)
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

    def sequence_bytes(self, length: int) -> int:
        return sequence_kv_bytes(self.windows.values(), self._row, length)

    def capacity_bytes(self) -> int:
        """The most the cache can come to hold: every slot at the full context."""
        return self.num_slots * self.sequence_bytes(self.max_len)

    def held_bytes(self) -> int:
        """What the live sequences' keys and values take now."""
        return sum(self.sequence_bytes(n) for n in self._lengths.values())

    def note_step(self, rows: list[tuple[int, int]]) -> None:
        """rows: (slot, newest position) of each sequence in a step: its length now."""
        for slot, pos in rows:
            self._lengths[slot] = pos + 1

    def release(self, slot: int) -> None:
        self._lengths.pop(slot, None)

    def forget_outside_window(self, layer: int, rows: list[tuple[int, int]], window: int):
        """A sliding layer never reads a position again once it is `window` behind the newest
        one: give back the memory of those positions (whole pages of a lazy CPU cache; they
        read as zeros afterwards), so the layer holds about its window per sequence.
        rows: (slot, newest position) of each sequence in the step."""
        maps = self._maps.get(layer)
        if maps is None:
            return
        k, page = self.k[layer], mmap.PAGESIZE
        row = k.shape[2] * k.shape[3] * k.element_size()
        for slot, pos in rows:
            base = slot * self.max_len * row
            end = (base + max(0, pos + 1 - window) * row) // page * page
            done = self._forgotten.get((layer, slot), base)
            if end < done:  # the slot holds a new, shorter sequence
                self._forgotten[layer, slot] = done = base
            if end - done < 4 * page:  # a syscall per 4 pages, not per token
                continue
            start = -(-done // page) * page
            for m in maps:  # a shared anonymous mapping: REMOVE frees its pages, DONTNEED not
                m.madvise(mmap.MADV_REMOVE, start, end - start)
            self._forgotten[layer, slot] = end

    def bytes_per_token(self) -> int:
        t = next(iter(self.k.values()))
        return 2 * len(self.k) * t.shape[2] * t.shape[3] * t.element_size()

    def buffers(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value stores of a layer, holding at least `length` positions,
        for kernels that write and read them in place."""
        self._reserve(layer, length)
        return self.k[layer], self.v[layer]

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
        if batch.first_slot is not None:  # consecutive slots: a view, not a copy of B caches
            s = batch.first_slot
            return kc[s:s + len(batch.slots), :L], vc[s:s + len(batch.slots), :L]
        return kc[batch.slots, :L], vc[batch.slots, :L]
