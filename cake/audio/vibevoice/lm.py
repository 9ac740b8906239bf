"""VibeVoice's Qwen2 language model run as cake pipeline stages.

The decoder layers are cake's own Llama-family blocks (cake/text/models/llama.py) holding
contiguous layer ranges, exactly as a text model's stages do, so the same split applies;
their parameters are shared with (not copied from) the transformers model that owns them.
A two-slot KV cache keeps both branches of classifier-free guidance: slot 0 the prompted
sequence, slot 1 the unconditional one, so one decode step advances both as a batch of two
rows at their own positions (transformers runs them as two separate forward passes).

In a cluster the layers run in a ring of stages instead (cake/audio/vibevoice/cluster.py),
which holds the two slots' caches on every node.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cake.text.kv_cache import KVCache, StepBatch
from cake.text.models.llama import Model, ModelArgs

PROMPTED, UNCONDITIONAL = 0, 1


def share_parameters(stage: Model, source: dict[str, nn.Parameter]) -> None:
    """Point each parameter of a stage built on the meta device at the source's tensor. A
    stage's embeddings, final norm or head that the source lacks stay unset: SpeechLM runs
    only the stage's layers (VibeVoice-Realtime's text LM has no norm and no head)."""
    for name, _ in list(stage.named_parameters()):
        if stage.checkpoint_name(name) not in source and ".layers." not in name:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = stage.get_submodule(owner_name) if owner_name else stage
        owner._parameters[leaf] = source[stage.checkpoint_name(name)]


def even_split(num_layers: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class SpeechLM:
    def __init__(self, language_model: nn.Module, lm_head: Optional[nn.Module],
                 text_config: dict, head_token_ids: list[int],
                 layer_ranges: Optional[list[tuple[int, int]]] = None, ring=None):
        """ring: a headless ClusterPipeline running the decoder layers on cluster nodes
        (language_model's own layers are then unused). lm_head None: no token choice."""
        args = ModelArgs.from_config(text_config)
        self.args, self.ring = args, ring
        params = {f"model.{k}": v for k, v in language_model.named_parameters()}
        if lm_head is not None:
            params["lm_head.weight"] = lm_head.weight
        ref = next(language_model.parameters())
        self.stages = []
        for start, end in [] if ring else layer_ranges or [(0, args.num_hidden_layers)]:
            with torch.device("meta"):
                stage = Model(args, start, end)
            share_parameters(stage, params)
            stage.reset_rope(ref.device)
            self.stages.append(stage)
        self.norm = language_model.norm
        self.embed = language_model.embed_tokens
        # Generation only ever chooses among a few tokens: keep just their rows of the head.
        self.head_token_ids = sorted(set(head_token_ids))
        self.head = (None if lm_head is None
                     else lm_head.weight[self.head_token_ids].detach().clone())
        self.device, self.dtype = ref.device, ref.dtype

    def new_cache(self, max_len: int) -> Optional[KVCache]:
        if self.ring is not None:  # every stage keeps its own layers' cache
            return None
        a = self.args
        return KVCache(range(a.num_hidden_layers), 2, min(max_len, a.max_position_embeddings),
                       a.num_key_value_heads, a.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, positions: list[list[int]], slots: list[int],
                cache: KVCache, every: bool = False) -> torch.Tensor:
        """Input embeddings [B, T, D] at the given positions of the given cache slots ->
        the final-norm hidden state of each row's last position [B, D] (every: of each
        position, [B, T, D])."""
        batch = StepBatch.make(positions, slots, embeds.device)
        if self.ring is not None:
            x = self.ring.forward(embeds, batch)
        else:
            x = embeds
            for stage in self.stages:
                x = stage.run_layers(x, batch, cache, kernels=False)
        return self.norm(x if every else x[:, -1])

    def load_prefix(self, cache: KVCache, slot: int,
                    layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put computed keys and values [n_kv, L, head_dim], one pair per layer (a voice
        preset's), at positions 0..L-1 of a slot, as if that prompt had just run."""
        if self.ring is not None:
            raise NotImplementedError("a prefix of keys and values cannot be sent to a ring")
        length = layers[0][0].shape[1]
        batch = StepBatch.make([list(range(length))], [slot], self.device)
        for layer, (k, v) in enumerate(layers):
            cache.update(layer, batch, k.transpose(0, 1)[None].to(self.device, cache.dtype),
                         v.transpose(0, 1)[None].to(self.device, cache.dtype))
        cache.note_step(batch.rows())

    def release(self) -> None:
        """The sequence in both slots is done (the ring forgets what it kept for replay)."""
        if self.ring is not None:
            self.ring.release(PROMPTED)
            self.ring.release(UNCONDITIONAL)

    def choose(self, hidden: torch.Tensor) -> list[int]:
        """Greedy choice among the head tokens, per row (ties go to the lowest id, as an
        argmax over the whole vocabulary would)."""
        logits = hidden.float() @ self.head.float().T
        return [self.head_token_ids[i] for i in logits.argmax(-1).tolist()]
