"""A decoder-only model made of the shared blocks, holding a contiguous range of its layers (a
pipeline stage): the first stage owns the embeddings, the last the final norm and head.
Parameter names follow the Hugging Face checkpoints (model.layers.N.… with the global layer
number N), so loading is a direct mapping; a family file changes only what differs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cake.text import quant
from cake.text.kv_cache import KVCache, StepBatch
from cake.text.models.args import ModelArgs
from cake.text.models.blocks import Rope, RMSNorm, TransformerBlock
from cake.text.models.rope import cos_sin, rope_frequencies


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """The global layers' frequency table."""
    dim = int(args.head_dim * getattr(args, "partial_rotary_factor", 1.0))
    return rope_frequencies(dim, args.rope_theta, args.rope_scaling,
                            getattr(args, "max_position_embeddings", 4096))[0]


class RopeStep:
    """The rope tables of one step: the kernel's frequency tables and, computed once per table
    and shared by the layers using it, cos/sin for the step's positions."""

    def __init__(self, model: "Model", batch: StepBatch, dtype: torch.dtype):
        self.model, self.batch, self.dtype = model, batch, dtype
        self._cos_sin: dict[str, tuple] = {}

    def table(self, rope: Optional[Rope]) -> torch.Tensor:
        return self.model.rope_none if rope is None else getattr(self.model, rope.table)

    def cos_sin(self, rope: Rope):
        if rope.table not in self._cos_sin:
            self._cos_sin[rope.table] = cos_sin(self.batch.positions, self.table(rope),
                                                rope.attention_factor, self.dtype)
        return self._cos_sin[rope.table]


class Model(nn.Module):
    """Decoder layers [start, end) of the model, plus the embeddings when start == 0 and the
    final norm and head when end == num_hidden_layers."""

    # False where a sequence's state is more than its cached keys and values (linear
    # attention): a cached prefix of another sequence cannot stand in for it.
    prefix_reusable = True
    expert_lru = None  # MoE experts read from the checkpoint as routed (expert_offload.py)

    def __init__(self, args: ModelArgs, start: int = 0, end: Optional[int] = None):
        super().__init__()
        end = args.num_hidden_layers if end is None else end
        self.args, self.start, self.end = args, start, end
        self.is_first, self.is_last = start == 0, end == args.num_hidden_layers
        self.model = nn.Module()
        if self.is_first:
            # Given a weight, Embedding skips its random init: normal_ on the meta device
            # imports torch._dynamo (~800 modules, ~70 MiB resident, ~1.5 s).
            self.model.embed_tokens = nn.Embedding(
                args.vocab_size, args.hidden_size,
                _weight=torch.empty(args.vocab_size, args.hidden_size))
        # A ModuleDict keyed by the global layer number keeps checkpoint names.
        tables = self._rope_tables()
        self.model.layers = nn.ModuleDict({
            str(i): self.block(i, tables) for i in range(start, end)})
        if self.is_last:
            self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            # A tied head on the stage that holds the embeddings is the embedding itself;
            # a later stage gets its own copy, loaded from model.embed_tokens.weight.
            tied_here = args.tie_word_embeddings and self.is_first
            self.lm_head = None if tied_here else nn.Linear(
                args.hidden_size, args.vocab_size, bias=False)
        self.has_windows = any(layer.window for layer in self.model.layers.values())
        self.reset_rope("cpu")
        # Fixed before loading swaps or fuses modules: the checkpoint's names for this stage,
        # and how each parameter is held (the loader notes quantized ones).
        self._tensor_names = [self.checkpoint_name(n) for n, _ in self.named_parameters()]
        self._shapes = {n: list(p.shape) for n, p in self.named_parameters()}
        self.quantized: dict[str, tuple[str, int]] = {}  # name -> (type, bytes)

    def block(self, i: int, tables: dict) -> nn.Module:
        """Decoder layer i (a family changes its mixer or MLP here)."""
        return TransformerBlock(self.args, self.args.window(i), self.layer_rope(i, tables))

    # --- rope -----------------------------------------------------------------------------

    def _rope_tables(self) -> dict[str, tuple[torch.Tensor, float]]:
        a = self.args
        dim = int(a.head_dim * a.partial_rotary_factor)
        tables = {"inv_freq": rope_frequencies(dim, a.rope_theta, a.rope_scaling,
                                               a.max_position_embeddings)}
        if a.rope_local is not None:
            tables["inv_freq_local"] = rope_frequencies(
                dim, a.rope_local["rope_theta"], a.rope_local.get("rope_scaling"),
                a.max_position_embeddings)
        return tables

    def layer_rope(self, i: int, tables: dict) -> Optional[Rope]:
        a = self.args
        if not a.has_rope(i):
            return None
        name = "inv_freq_local" if a.rope_local is not None and a.window(i) else "inv_freq"
        return Rope(name, int(a.head_dim * a.partial_rotary_factor), tables[name][1], a.head_dim)

    def reset_rope(self, device) -> None:
        """(Re)compute the rope tables on a device (loading leaves buffers uninitialised); the
        tables stay fp32 for precision."""
        for name, (table, _) in self._rope_tables().items():
            self.register_buffer(name, table.to(device), persistent=False)
        self.register_buffer("rope_none", torch.zeros(self.args.head_dim // 2, device=device),
                             persistent=False)

    # --- checkpoint -----------------------------------------------------------------------

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint tensor a parameter is loaded from."""
        if name == "lm_head.weight" and self.args.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def tensor_names(self) -> list[str]:
        """Checkpoint tensors this stage needs."""
        return list(self._tensor_names)

    def tensor_details(self) -> dict[str, tuple[list[int], str, int]]:
        """Parameter name (as in the checkpoint's layout) -> (shape, type, bytes held), whatever
        form loading gave it (quantized blocks, fused matrices)."""
        dtype = next(self.parameters()).dtype  # the norms stay dense parameters
        dense = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
            dtype, str(dtype))
        size = torch.empty((), dtype=dtype).element_size()
        return {n: (shape, *self.quantized.get(n, (dense, math.prod(shape) * size)))
                for n, shape in self._shapes.items()}

    @torch.no_grad()
    def load_tensors(self, get_tensor) -> None:
        """Fill parameters from a checkpoint: get_tensor(name) -> torch.Tensor. (Quantized
        modules hold buffers, not parameters: they were filled when they were made.)"""
        for name, p in self.named_parameters():
            t = get_tensor(self.checkpoint_name(name))
            if t.shape != p.shape:
                raise ValueError(f"{name}: checkpoint has shape {tuple(t.shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            if self.plus_one(name):
                t = t.float() + 1.0  # (1 + w) computed once, in float32 as Gemma does
            p.copy_(t)

    def plus_one(self, name: str) -> bool:
        """Whether a checkpoint norm holds the w of a (1 + w) RMSNorm."""
        return self.args.norm_plus_one and name.endswith("norm.weight")

    def fuse_projections(self) -> None:
        """Join q/k/v and gate/up into one matrix each (after loading)."""
        for layer in self.model.layers.values():
            layer.fuse()
            if next(self.parameters()).device.type == "cpu" and quant.available():
                layer.prepare_kernel()

    def release_sequence(self, slot: int, cache: KVCache) -> None:
        """A sequence's slot (or first block) is free: forget what the layers keep for it
        beside the KV cache."""

    # --- running --------------------------------------------------------------------------

    @staticmethod
    def attention_mask(batch: StepBatch, window: Optional[int]) -> torch.Tensor:
        """[B, 1, T, L] boolean: a query attends to cached positions <= its own (and within
        the sliding window). A slot holds one sequence's tokens at indices 0..pos."""
        kv_pos = torch.arange(batch.kv_len, device=batch.positions.device)[None, None, :]
        q_pos = batch.positions[:, :, None]
        mask = kv_pos <= q_pos
        if window is not None:
            mask &= kv_pos > q_pos - window
        return mask[:, None]

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: KVCache,
                logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: token ids [B, T] on the first stage, hidden states [B, T, D] on the others.
        Returns hidden states, or on the last stage logits (for the positions logits_at[b]
        of each row when given, else for every position)."""
        if self.is_first:
            x = self.model.embed_tokens(x)
            if self.args.embed_scale is not None:
                x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        x = self.run_layers(x, batch, cache)
        if not self.is_last:
            return x
        if logits_at is not None and x.shape[1] > 1:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]
        elif logits_at is not None:
            x = x[:, 0]
        return self.head(self.model.norm(x))

    def run_layers(self, x: torch.Tensor, batch: StepBatch, cache: KVCache,
                   kernels: Optional[bool] = None) -> torch.Tensor:
        """The stage's decoder layers over hidden states x [B, T, D]. kernels: through our CPU
        decode kernels (default: single-token float32 steps on CPU), else PyTorch's ops."""
        ropes = RopeStep(self, batch, x.dtype)
        if self.kernel_decode(x, cache) if kernels is None else kernels:
            for i, layer in self.model.layers.items():
                x = layer.decode(x, ropes, batch, cache, int(i))
        else:
            windows = {layer.window for layer in self.model.layers.values()}
            masks = {w: self.attention_mask(batch, w) for w in windows}
            for i, layer in self.model.layers.items():
                x = layer(x, ropes, masks[layer.window], batch, cache, int(i))
        rows = batch.rows()
        cache.note_step(rows)
        if self.has_windows:
            for i, layer in self.model.layers.items():
                if layer.window:
                    cache.forget_outside_window(int(i), rows, layer.window)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            logits = self.lm_head(x)
        elif isinstance(self.model.embed_tokens, quant.QuantEmbedding):
            logits = self.model.embed_tokens.table(x)
        else:
            logits = F.linear(x, self.model.embed_tokens.weight)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @staticmethod
    def kernel_decode(x: torch.Tensor, cache: KVCache) -> bool:
        """Single-token steps on CPU in float32 take our kernel path."""
        return (x.shape[1] == 1 and x.device.type == "cpu" and x.dtype == torch.float32
                and cache.dtype in (torch.float32, torch.float16) and quant.available())
