"""The path one step takes through the model: embed -> stage 1 -> ... -> stage N -> head.

The engine talks to a Pipeline and never knows where the stages run. LocalPipeline holds
every stage in this process (single-machine serving); a cluster pipeline implements the same
three members with stages on other machines.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from cake.text.kv_cache import KVCache, StepBatch, serving_dtype


class Pipeline(Protocol):
    num_slots: int
    max_len: int
    device: torch.device

    def forward(self, tokens: torch.Tensor, batch: StepBatch,
                logits_at: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens [B, T] -> logits [B, V] at logits_at (one position per row)."""

    def release(self, slot: int) -> None:
        """A sequence left its slot: forget whatever is cached for it."""

    def kv_cache_stats(self) -> dict:
        """{"kv_cache_bytes": held now, "kv_cache_capacity_bytes": the most it can hold}."""


class LocalPipeline:
    def __init__(self, stages: list, num_slots: int, max_len: int, checkpoint=None,
                 quant: Optional[str] = None):
        """checkpoint, quant: what the stages were loaded from, for the topology document."""
        self.stages, self.num_slots, self.max_len = stages, num_slots, max_len
        from cake.cluster.topology import TensorTable  # the table, not the whole checkpoint

        self.checkpoint = None if checkpoint is None else TensorTable(checkpoint)
        self.quant = quant
        first = stages[0]
        self.prefix_reusable = all(s.prefix_reusable for s in stages)
        param = next(first.parameters())
        self.device, self.dtype = param.device, param.dtype
        args = first.args
        self.caches = [
            KVCache(range(s.start, s.end), num_slots, max_len, args.num_key_value_heads,
                    args.head_dim, serving_dtype(self.dtype, self.device), self.device,
                    windows={i: args.window(i) for i in range(s.start, s.end)})
            for s in stages]

    @torch.inference_mode()
    def forward(self, tokens, batch, logits_at=None):
        x = tokens
        for stage, cache in zip(self.stages, self.caches):
            x = stage(x, batch, cache, logits_at=logits_at if stage.is_last else None)
        return x

    def release(self, slot: int) -> None:
        # Positions past a sequence's length are masked out, so a reused slot needs no wipe.
        for stage, cache in zip(self.stages, self.caches):
            cache.release(slot)
            stage.release_sequence(slot, cache)

    def kv_cache_stats(self) -> dict:
        """Bytes the KV cache holds now and can come to hold (sliding layers: their window)."""
        stats = {"kv_cache_bytes": sum(c.held_bytes() for c in self.caches),
                 "kv_cache_capacity_bytes": sum(c.capacity_bytes() for c in self.caches)}
        for lru in {id(s.expert_lru): s.expert_lru for s in self.stages
                    if getattr(s, "expert_lru", None) is not None}.values():
            stats.update(lru.stats())  # one LRU per stage; a local pipeline has one stage
        return stats

    def fork(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot src into slot dst (n > 1)."""
        for stage, cache in zip(self.stages, self.caches):
            for store in (cache.k, cache.v):
                for t in store.values():
                    t[dst, :length] = t[src, :length]
            stage.fork_sequence(src, dst, cache)

    @torch.inference_mode()
    def hidden(self, tokens, batch, logits_at) -> torch.Tensor:
        """The final norm's output at logits_at [B, D] (what embeddings pool), instead of
        logits; read with a hook, so the model's own forward is the one that runs."""
        captured = []
        norm = self.stages[-1].model.norm
        handle = norm.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self.forward(tokens, batch, logits_at)
        finally:
            handle.remove()
        return captured[-1]

    def topology(self, model_id: str) -> dict:
        from cake.cluster.topology import text_topology

        doc = text_topology(model_id, self.stages, checkpoint=self.checkpoint, quant=self.quant)
        doc["master"].update(self.kv_cache_stats())
        return doc
