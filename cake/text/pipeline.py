"""The path one step takes through the model: embed -> stage 1 -> ... -> stage N -> head.

The engine talks to a Pipeline and never knows where the stages run. LocalPipeline holds
every stage in this process (single-machine serving); a cluster pipeline implements the same
same interface with stages on other machines.
"""
from __future__ import annotations

import os
from typing import Optional, Protocol

import torch

from cake.text.kv_cache import KVCache, StepBatch, kv_block_bytes, serving_dtype


class Pipeline(Protocol):
    """What the engine uses of a pipeline. Its KV cache is num_blocks blocks of block_size
    positions; the engine hands them out (kv_cache.BlockPool) and names each row's blocks in
    the StepBatch. A pipeline whose blocks hold a whole context (a speech model's ring) is a slot
    cache under the same interface."""

    max_len: int
    device: torch.device
    num_blocks: int
    block_size: int
    prefix_reusable: bool  # whether cached KV blocks may start another sequence
    state_is_kv: bool  # False: recurrent layers keep a state per sequence beside the KV
    can_copy_blocks: bool  # copy_blocks works (n > 1 forks share a prompt's blocks)
    depth: int  # steps the engine may keep in flight (submit/collect); 1: forward only
    # Where every layer slides: positions this far behind the next one are read by no layer,
    # so their blocks can go back to the pool (None: some layer reads the whole sequence).
    block_window: Optional[int]

    def attach(self, owner: "KVOwner") -> None:
        """The engine that hands out the blocks (asked what to recompute after a loss)."""

    def forward(self, tokens: torch.Tensor, batch: StepBatch,
                logits_at: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens [B, T] -> logits [B, V] at logits_at (one position per row)."""

    def hidden(self, tokens: torch.Tensor, batch: StepBatch,
               logits_at: Optional[torch.Tensor]) -> torch.Tensor:
        """As forward, but the final norm's output [B, D] at logits_at (embeddings)."""

    def submit(self, tokens: torch.Tensor, batch: StepBatch,
               logits_at: Optional[torch.Tensor]) -> int:
        """Start a step; its logits come from collect(handle)."""

    def collect(self, handle: int) -> torch.Tensor:
        """The logits of a submitted step."""

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each block src -> dst in every layer."""

    def release(self, block: int) -> None:
        """A block holds nothing anymore: forget whatever is kept for it."""

    def kv_cache_stats(self) -> dict:
        """{"kv_cache_capacity_bytes": the most it can hold, and "kv_cache_bytes" (held now)
        where the pipeline counts it itself}."""

    def close(self) -> None:
        """Let go of whatever the pipeline holds outside this process (a cluster's stages)."""


class KVOwner(Protocol):
    """What a pipeline that loses a stage's cache asks of the engine."""

    def live_kv(self) -> list[tuple[list[int], list[int]]]:
        """(tokens cached, block table) of every live sequence."""

    def forget_prefix_cache(self) -> None:
        """Drop the cached blocks no sequence references."""


def all_sliding_window(args, layers: range) -> Optional[int]:
    """The widest window when every layer slides, else None (see Pipeline.block_window)."""
    windows = [args.window(i) for i in layers]
    return max(windows) if windows and all(windows) else None


def pool_blocks(block_bytes: int, block_size: int, max_len: int, max_batch: int,
                memory: Optional[int], device) -> int:
    """How many blocks a pool gets: `memory` bytes (default: a quarter of the free RAM, or
    of the free memory of a GPU), and no more than max_batch sequences at the full context
    could use, twice over (the rest would only be a bigger prefix cache)."""
    if memory is None:
        memory = free_memory(device) // 4
    most = 2 * max_batch * -(-max_len // block_size)
    return max(1, min(most, memory // block_bytes))


def free_memory(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LocalPipeline:
    depth = 1
    can_copy_blocks = True

    def __init__(self, stages: list, max_len: int, checkpoint=None, quant: Optional[str] = None,
                 kv_memory: Optional[int] = None, block_size: int = 16, max_batch: int = 64,
                 num_blocks: Optional[int] = None, companion_position_bytes: int = 0):
        """checkpoint, quant: what the stages were loaded from, for the topology document.
        kv_memory: bytes for the KV block pool (default: see pool_blocks); num_blocks: the
        pool's size instead (a draft model's: as many blocks as the target's, under the
        same block tables); companion_position_bytes: what each position of a block costs in
        such a companion pool too, so that both pools fit in kv_memory."""
        self.stages, self.max_len, self.block_size = stages, max_len, block_size
        from cake.cluster.topology import TensorTable  # the table, not the whole checkpoint

        self.checkpoint = None if checkpoint is None else TensorTable(checkpoint)
        self.quant = quant
        first = stages[0]
        param = next(first.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.prefix_reusable = self.state_is_kv = all(s.prefix_reusable for s in stages)
        args = first.args
        kv_dtype = serving_dtype(self.dtype, self.device)
        # Only attention layers take room in a block (DeltaNet layers keep no KV): a hybrid
        # model's pool holds as many more blocks, so admission lets in as many more sequences.
        layers = sum(len(args.kv_layers(s.start, s.end)) for s in stages)
        block_bytes = kv_block_bytes(args, layers, kv_dtype, block_size) \
            + companion_position_bytes * block_size
        self.num_blocks = num_blocks or pool_blocks(block_bytes, block_size, max_len,
                                                    max_batch, kv_memory, self.device)
        self.block_window = all_sliding_window(args, range(args.num_hidden_layers))
        self.caches = [KVCache.pool(args.kv_layers(s.start, s.end), self.num_blocks,
                                    block_size, args.num_key_value_heads, args.head_dim,
                                    kv_dtype, self.device)
                       for s in stages]

    @torch.inference_mode()
    def forward(self, tokens, batch, logits_at=None):
        x = tokens
        for stage, cache in zip(self.stages, self.caches):
            x = stage(x, batch, cache, logits_at=logits_at if stage.is_last else None)
        return x

    def submit(self, tokens, batch, logits_at=None):
        return self.forward(tokens, batch, logits_at)

    def attach(self, owner) -> None:  # one process: no stage's cache is ever lost
        pass

    def collect(self, handle):
        return handle

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for cache in self.caches:
            cache.copy_blocks(pairs)

    def release(self, block: int) -> None:
        # Positions a row has not written are masked out: a reused block needs no wipe. A
        # recurrent layer's state is kept under its sequence's first block: it goes too.
        for stage, cache in zip(self.stages, self.caches):
            stage.release_sequence(block, cache)

    def kv_cache_stats(self) -> dict:
        stats = {"kv_cache_capacity_bytes": sum(c.capacity_bytes() for c in self.caches)}
        for stage in self.stages:
            if stage.expert_lru is not None:
                stats.update(stage.expert_lru.stats())  # a local pipeline has one stage
        return stats

    def close(self) -> None:
        pass  # everything it holds goes with the process

    @torch.inference_mode()
    def hidden(self, tokens, batch, logits_at) -> torch.Tensor:
        return final_hidden(self, self.stages[-1].model.norm, tokens, batch, logits_at)

    def topology(self, model_id: str) -> dict:
        from cake.cluster.topology import text_topology

        doc = text_topology(model_id, self.stages, checkpoint=self.checkpoint, quant=self.quant)
        doc["master"].update(self.kv_cache_stats())
        return doc


@torch.inference_mode()
def final_hidden(pipeline, norm, tokens, batch, logits_at) -> torch.Tensor:
    """The final norm's output at logits_at [B, D] (what embeddings pool), instead of
    logits; read with a hook, so the pipeline's own forward is the one that runs."""
    captured = []
    handle = norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        pipeline.forward(tokens, batch, logits_at)
    finally:
        handle.remove()
    return captured[-1]
