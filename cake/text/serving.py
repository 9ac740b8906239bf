"""A loaded text model ready to serve: checkpoint -> tokenizer, pipeline, engine."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cake.device import best_device, default_dtype
from cake.text.draft_model import DraftModel, UnfitDraft, check_vocabulary, weight_bytes
from cake.text.engine import Engine
from cake.text.kv_cache import kv_position_bytes, serving_dtype
from cake.text.loader import load_stage, resolve_quant
from cake.text.models.llama import ModelArgs
from cake.text.pipeline import LocalPipeline
from cake.text.sampling import SamplingParams
from cake.text.tokenizer import Tokenizer
from cake.text.weights import open_checkpoint

log = logging.getLogger(__name__)


def load_tokenizer(checkpoint) -> Tokenizer:
    """The tokenizer.json beside the weights, else (GGUF) the one in the file's metadata."""
    is_gguf = hasattr(checkpoint, "tokenizer")
    folder = Path(checkpoint.path).parent if is_gguf else checkpoint.folder
    if not is_gguf or (folder / "tokenizer.json").exists():
        return Tokenizer.from_dir(folder)
    special = checkpoint.special_tokens()
    eos = checkpoint.config.get("eos_token_id")
    return Tokenizer(checkpoint.tokenizer(), checkpoint.chat_template(),
                     special.get("bos_token"), special.get("eos_token"),
                     add_bos=special.get("add_bos", False),
                     extra_stop_ids=[eos] if isinstance(eos, int) else (eos or []))


def load_draft_model(checkpoint, name: str, target, tokenizer: Tokenizer, vocab_size: int,
                     dtype, device, quant: str) -> DraftModel:
    """A draft model for the target pipeline: its vocabulary checked, its KV pool as many
    blocks of the same size as the target's (the engine's block tables name both)."""
    if not target.state_is_kv:
        raise UnfitDraft("--draft-model: this model keeps a recurrent state beside its KV "
                         "cache, so it cannot verify drafts")
    if target.block_window is not None:
        raise UnfitDraft("--draft-model: every layer of this model slides its window and gives "
                         "old blocks back, which a draft model would still read")
    args = ModelArgs.from_config(checkpoint.config)
    check_vocabulary(name, tokenizer, vocab_size, load_tokenizer(checkpoint), args.vocab_size)
    stage = load_stage(checkpoint, dtype=dtype, device=device, quant_mode=quant)
    if not stage.prefix_reusable:
        raise UnfitDraft(f"draft model {name} keeps a recurrent state: it cannot roll back a "
                         "rejected guess")
    pipeline = LocalPipeline([stage], max_len=min(args.max_position_embeddings, target.max_len),
                             block_size=target.block_size, num_blocks=target.num_blocks)
    if pipeline.block_window is not None:
        raise UnfitDraft(f"draft model {name} slides every layer's window: use one that reads "
                         "the whole context")
    cost = weight_bytes(stage) / sum(weight_bytes(s) for s in target.stages)
    log.info("draft model %s: %d layers, a step ~%.2f of the model's", name,
             args.num_hidden_layers, cost)
    return DraftModel(name, pipeline, cost)


@dataclass
class TextModel:
    model_id: str
    tokenizer: Tokenizer
    engine: Engine
    defaults: SamplingParams
    dtype: torch.dtype
    device: str
    num_layers: int

    @property
    def context_length(self) -> int:
        return self.engine.max_len

    def close(self) -> None:
        self.engine.shutdown()
        self.engine.pipeline.close()

    def params(self, **overrides) -> SamplingParams:
        """Request fields over the server defaults; None means 'not given'."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self.defaults, **given)


def load_text_model(path: str | Path, model_id: str, device: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None, defaults: Optional[SamplingParams] = None,
                    max_batch: int = 64, context_length: Optional[int] = None,
                    cluster=None, quant: str = "auto", kv_memory: Optional[int] = None,
                    max_queue: int = 1024, draft_tokens: int = 7, expert_offload: bool = False,
                    expert_memory: Optional[int] = None, draft_model: Optional[tuple] = None,
                    draft_min: int = 0) -> TextModel:
    """cluster: ClusterOptions to spread the layers over workers (None: this machine alone).
    quant: weight format (cake.text.loader.resolve_quant); "auto" keeps a GGUF's blocks.
    kv_memory: bytes of the KV block pool (None: a share of the free memory); max_queue:
    requests that may wait for a place before new ones are turned away; draft_tokens: how far
    greedy decoding guesses ahead (0: no speculation). expert_offload, expert_memory: MoE
    experts read from the checkpoint as they are routed, expert_memory bytes of them resident
    (cake.text.expert_offload.budget_for). draft_model: (path, name) of a small model of the
    same vocabulary that guesses ahead too, on this machine only; draft_min: tokens it guesses
    each step at least (0: as many as its record says pay). Raises UnfitDraft (one line) for
    a draft model that cannot serve this one."""
    device = device or best_device()
    dtype = dtype or default_dtype(device)
    checkpoint = open_checkpoint(path)
    tokenizer = load_tokenizer(checkpoint)
    args = ModelArgs.from_config(checkpoint.config)
    ctx = args.max_position_embeddings
    if context_length:
        ctx = min(ctx, context_length)
    if draft_model is not None and draft_tokens <= 0:
        raise UnfitDraft("--draft-model guesses up to --draft-tokens tokens: it cannot be 0")
    if draft_model is not None and cluster is not None:
        raise UnfitDraft("--draft-model runs on one machine: it cannot be used with a cluster "
                         "(--cluster-key)")
    draft_checkpoint, draft_kv = None, 0
    if draft_model is not None:  # its KV pool shares --kv-memory with the model's
        draft_checkpoint = open_checkpoint(draft_model[0])
        draft_kv = kv_position_bytes(ModelArgs.from_config(draft_checkpoint.config),
                                     serving_dtype(dtype, device))
    if cluster is not None:
        from cake.cluster.pipeline import start_cluster_pipeline
        pipeline = start_cluster_pipeline(checkpoint, dtype, device, max_batch, ctx, cluster,
                                          quant, kv_memory=kv_memory)
    else:
        from cake.text.expert_offload import budget_for
        budget = budget_for(checkpoint, expert_offload, expert_memory)
        pipeline = LocalPipeline([load_stage(checkpoint, dtype=dtype, device=device,
                                             quant_mode=quant, expert_budget=budget)],
                                 max_len=ctx, checkpoint=checkpoint,
                                 quant=resolve_quant(quant, device), kv_memory=kv_memory,
                                 max_batch=max_batch, companion_position_bytes=draft_kv)
    del checkpoint  # the stages and the pipeline hold what they need; loading's memory can go
    drafter = None
    if draft_model is not None:
        drafter = load_draft_model(draft_checkpoint, draft_model[1], pipeline, tokenizer,
                                   args.vocab_size, dtype, device, quant)
    engine = Engine(pipeline, tokenizer, vocab_size=args.vocab_size, max_batch=max_batch,
                    max_queue=max_queue, draft_tokens=draft_tokens, drafter=drafter,
                    draft_min=draft_min)
    engine.start()
    log.info("loaded %s: %d layers, %s on %s, context %d", model_id,
             args.num_hidden_layers, dtype, device, ctx)
    return TextModel(model_id, tokenizer, engine, defaults or SamplingParams(), dtype, device,
                     args.num_hidden_layers)
