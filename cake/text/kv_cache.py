"""The KV cache: a pool of fixed-size blocks per layer, and the host side that hands them out.

Each layer owns a key and a value tensor of shape [blocks, block_size, n_kv_heads, head_dim].
A sequence holds a block table: position p lives in block table[p // block_size] at offset
p % block_size. Blocks are handed out by a BlockPool; full blocks are content-addressed (a hash
chain over their token ids, as vLLM does), so a new request maps the longest prefix another
one computed and prefills only the rest. A slot cache (one block of the whole context per
sequence: speech models, on one machine or a ring) is the same with block_size = the context.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
import hashlib
import math
import mmap
from typing import Optional, Sequence

import torch
from array import array


@dataclass
class StepBatch:
    """What every stage needs to run one step: where each row's tokens sit.

    positions: [B, T] position of each token.
    slots: [B] the block of each row when every row's positions fit one block (a slot cache:
        the row's slot), else [B, W] each row's block table (padded with block 0).
    kv_len: how many positions the step attends over (max position + 1).
    span: (block, first position) when the step is one row of consecutive positions in one
        block, which the cache then writes and reads as plain slices, with no index tensors
        and no reads of device tensors from the host.
    """

    positions: torch.Tensor
    slots: torch.Tensor
    kv_len: int
    span: Optional[tuple[int, int]] = None
    first_slot: Optional[int] = None  # when the rows' slots are first_slot, first_slot + 1, ...
    newest: Optional[list[tuple[int, int]]] = None  # (slot, newest position) per row
    copies: list = field(default_factory=list)  # (src, dst) blocks to copy before the step
    _index: dict = field(default_factory=dict, repr=False)  # block size -> pool rows

    def rows(self) -> list[tuple[int, int]]:
        """(slot, newest position) of each row, from the host lists when make() had them."""
        if self.newest is None:
            first = self.slots if self.slots.dim() == 1 else self.slots[:, 0]
            self.newest = list(zip(first.tolist(), self.positions.amax(1).tolist()))
        return self.newest

    @classmethod
    def make(cls, positions: list[list[int]], slots: list, device) -> "StepBatch":
        """slots: each row's slot (int) or block table (list of block ids)."""
        tables = [s if isinstance(s, (list, tuple)) else [s] for s in slots]
        width = max(len(t) for t in tables)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        if width > 1:
            padded = [list(t) + [0] * (width - len(t)) for t in tables]
            return cls(pos, torch.tensor(padded, dtype=torch.long, device=device),
                       max(max(p) for p in positions) + 1,
                       newest=[(t[0], max(p)) for t, p in zip(tables, positions)])
        slots = [t[0] for t in tables]
        span = None
        if len(slots) == 1:
            p0 = positions[0][0]
            if list(positions[0]) == list(range(p0, p0 + len(positions[0]))):
                span = (slots[0], p0)
        first = slots[0] if list(slots) == list(range(slots[0], slots[0] + len(slots))) else None
        return cls(pos, torch.tensor(slots, dtype=torch.long, device=device),
                   max(max(p) for p in positions) + 1, span, first,
                   [(s, max(p)) for s, p in zip(slots, positions)])

    def pool_rows(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For block tables: the pool rows (block * block_size + offset) the step writes,
        [B, T], and reads, [B, kv_len]; computed once per step and shared by the layers."""
        if block_size not in self._index:
            t, bs = self.slots, block_size
            write = t.gather(1, self.positions // bs) * bs + self.positions % bs
            j = torch.arange(self.kv_len, device=t.device)
            read = t[:, j // bs] * bs + j % bs
            self._index[block_size] = (write, read)
        return self._index[block_size]


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


def kv_block_bytes(args, layers: int, dtype: torch.dtype, block_size: int) -> int:
    """One block of a pool over `layers` attention layers (at least one)."""
    return kv_row_bytes(args.num_key_value_heads, args.head_dim, dtype) * max(1, layers) \
        * block_size


def kv_position_bytes(args, dtype: torch.dtype) -> int:
    """One position's keys and values in every attention layer of a whole model."""
    return kv_block_bytes(args, len(args.kv_layers(0, args.num_hidden_layers)), dtype, 1)


def sequence_kv_bytes(windows, row_bytes: int, length: int) -> int:
    """Keys and values of one sequence of `length` positions over layers with these sliding
    windows (None: global): a sliding layer holds at most its window of positions.
    row_bytes: one position's key and value in one layer."""
    return row_bytes * sum(min(length, w or length) for w in windows)


class KVCache:
    """Memory follows the longest live sequence rather than the model's whole context times
    the slots: on CPU the whole context is reserved but paged in only where written; on other
    devices (or with initial_len) capacity grows by doubling up to max_len."""

    def __init__(self, layers: Sequence[int], num_slots: int, max_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, initial_len: Optional[int] = None,
                 windows: Optional[dict[int, Optional[int]]] = None):
        """dtype: what keys and values are stored as (see serving_dtype). windows: layer ->
        sliding window (None: global), for counting what the cache holds."""
        self.max_len, self.num_slots, self.dtype = max_len, num_slots, dtype
        self.block_size: Optional[int] = None  # a pool of blocks (see pool()), else slots
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

    @classmethod
    def pool(cls, layers: Sequence[int], num_blocks: int, block_size: int, n_kv_heads: int,
             head_dim: int, dtype: torch.dtype, device) -> "KVCache":
        """A pool of num_blocks blocks of block_size positions, read through block tables.
        On CPU its pages are mapped only when written, so an idle pool costs nothing."""
        cpu = torch.device(device).type == "cpu"
        cache = cls(layers, num_blocks, block_size, n_kv_heads, head_dim, dtype, device,
                    initial_len=None if cpu else block_size)
        cache.block_size = block_size
        return cache

    def block_bytes(self) -> int:
        """Keys and values of one block over every layer of the cache."""
        return self._row * len(self.windows) * self.max_len

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy blocks src -> dst in every layer (copy-on-write of a shared block)."""
        src = torch.tensor([a for a, _ in pairs])
        dst = torch.tensor([b for _, b in pairs])
        for store in (self.k, self.v):
            for t in store.values():
                t[dst.to(t.device)] = t[src.to(t.device)]

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
        if self.block_size is not None:  # a pool: its BlockPool counts what is held
            return
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
        if maps is None or self.block_size is not None:  # a pool's blocks may be shared
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
        if not self.k:  # a stage of linear-attention layers only
            return 0
        t = next(iter(self.k.values()))
        return 2 * len(self.k) * t.shape[2] * t.shape[3] * t.element_size()

    def buffers(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value stores of a layer, holding at least `length` positions
        (a pool: any length its block tables reach), for kernels that write and read them
        in place."""
        if self.block_size is None:
            self._reserve(layer, length)
        return self.k[layer], self.v[layer]

    def update(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, T, n_kv, head_dim] at the batch positions and return the keys and
        values [B, kv_len, n_kv, head_dim] the step attends over."""
        L = batch.kv_len
        kc, vc = self.k[layer], self.v[layer]
        if batch.slots.dim() == 2:  # block tables: scatter into the pool, gather the rows
            write, read = batch.pool_rows(kc.shape[1])
            kf, vf = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])
            kf[write] = k.to(kf.dtype)
            vf[write] = v.to(vf.dtype)
            return kf[read], vf[read]
        self._reserve(layer, L)
        kc, vc = self.k[layer], self.v[layer]
        if batch.span is not None:
            s, p0 = batch.span
            T = k.shape[1]
            kc[s, p0:p0 + T] = k[0]
            vc[s, p0:p0 + T] = v[0]
            return kc[s:s + 1, :L], vc[s:s + 1, :L]
        rows = batch.slots[:, None]
        kc[rows, batch.positions] = k.to(kc.dtype)
        vc[rows, batch.positions] = v.to(vc.dtype)
        if batch.first_slot is not None:  # consecutive slots: a view, not a copy of B caches
            s = batch.first_slot
            return kc[s:s + len(batch.slots), :L], vc[s:s + len(batch.slots), :L]
        return kc[batch.slots, :L], vc[batch.slots, :L]


def block_hashes(tokens: list[int], block_size: int, hashes: list[bytes]) -> list[bytes]:
    """Extend `hashes` (of the first blocks of tokens) to every full block of tokens: each
    block's hash covers its token ids and the hash before it, so equal hashes mean equal
    prefixes."""
    for i in range(len(hashes), len(tokens) // block_size):
        h = hashlib.blake2b(hashes[-1] if hashes else b"", digest_size=16)
        h.update(array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes())
        hashes.append(h.digest())
    return hashes


class BlockPool:
    """The host side of a paged cache: which blocks are free, who references which, and the
    prefix cache of full blocks by hash. A block nobody references but whose hash is known
    stays cached until a new block is needed; the least recently used goes first."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # nothing worth keeping
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, hashed, LRU first
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.queried_tokens = self.hit_tokens = 0  # prefix lookups, for /health

    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def used(self) -> int:
        return self.num_blocks - self.available()

    def allocate(self) -> int:
        """A block of one reference, evicting the least recently used cached one if need be."""
        if self.free:
            # The most recently freed first: its pages are mapped and likely in cache, and a
            # block never written stays unmapped until the pool really needs it.
            b = self.free.pop()
        else:
            b, _ = self.cached.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
        self.refs[b] = 1
        return b

    def share(self, b: int) -> None:
        if self.refs[b] == 0:
            del self.cached[b]
        self.refs[b] += 1

    def release(self, b: int) -> bool:
        """Drop one reference; True when the block now holds nothing worth keeping."""
        self.refs[b] -= 1
        if self.refs[b]:
            return False
        if b in self.hash_of:
            self.cached[b] = None  # most recently used end
            return False
        self.free.append(b)
        return True

    def register(self, b: int, h: bytes) -> None:
        """Block b now holds the full block with hash h (a duplicate of a cached one is not
        registered: its copy serves)."""
        if h not in self.by_hash and b not in self.hash_of:
            self.by_hash[h], self.hash_of[b] = b, h

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of these block hashes, each shared."""
        found = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            self.share(b)
            found.append(b)
        return found

    def forget_cached(self) -> list[int]:
        """Drop the prefix cache's unreferenced blocks (their keys and values were lost);
        returns them, free now. Referenced blocks keep their hashes."""
        gone = list(self.cached)
        for b in gone:
            del self.by_hash[self.hash_of.pop(b)]
        self.cached.clear()
        self.free.extend(gone)
        return gone

    def stats(self) -> dict:
        return {"kv_blocks_total": self.num_blocks, "kv_blocks_used": self.used(),
                "kv_blocks_cached": len(self.cached), "kv_block_size": self.block_size,
                "prefix_cache_queried_tokens": self.queried_tokens,
                "prefix_cache_hit_tokens": self.hit_tokens,
                "prefix_cache_hit_rate": round(self.hit_tokens / self.queried_tokens, 4)
                if self.queried_tokens else 0.0}
