"""The Llama family: Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2/2.5, Qwen3, Falcon3.

One module covers them all by config flags (qkv bias, q/k norm, sliding window, rope scaling,
tied embeddings). Weight names follow the Hugging Face checkpoints so loading is a direct
mapping. A model instance may hold only a contiguous range of decoder layers (a pipeline
stage); the first stage owns the embeddings, the last the final norm and head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cake.text import quant
from cake.text.kv_cache import KVCache, StepBatch


@dataclass
class ModelArgs:
    """Mirrors the fields of config.json that the family uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q, k, v and o (Llama option)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3)
    sliding_window: Optional[int] = None
    layer_types: Optional[list[str]] = None  # per layer "sliding_attention"/"full_attention"
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type", "llama")
        heads = cfg["num_attention_heads"]
        # transformers 5 folds rope_theta/rope_scaling into rope_parameters.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = cfg.get("rope_scaling") or rope
        if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        sliding = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if model_type in ("qwen2", "qwen3"):
            # Qwen slides only when asked, and only in layers >= max_window_layers.
            if not cfg.get("use_sliding_window", False):
                sliding, layer_types = None, None
            elif layer_types is None:
                layer_types = ["sliding_attention" if i >= cfg.get("max_window_layers", 0)
                               else "full_attention" for i in range(cfg["num_hidden_layers"])]
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            attention_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            layer_types=layer_types,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
            eos_token_id=eos,
            bos_token_id=cfg.get("bos_token_id"),
        )

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of a layer, None where it attends to the whole sequence."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    # On the CPU even under torch.device("meta"): meta float64 pow would pull in torch's
    # Python decompositions (~800 modules, ~70 MiB resident).
    steps = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu")
    inv = 1.0 / (args.rope_theta ** (steps / dim))
    s = args.rope_scaling
    if s is None:
        return inv.float()
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return (inv / s["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"unsupported rope scaling {kind!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        dim, qkv_bias = args.hidden_size, args.qkv_bias or args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj = None  # q, k and v as one matrix, once fuse() has run

    def fuse(self) -> None:
        """One matrix product for q, k and v instead of three."""
        fused = quant.fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def project(self, x):
        """q, k, v: [B, T, heads, head_dim] each, q and k normalized (Qwen3) but not rotated."""
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(
                [self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                 self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def decode(self, x, inv_freq, window, batch: StepBatch, cache: KVCache, layer: int):
        """One new token per row through our CPU kernel: rope, cache write and attention over
        each row's own slot in one call (no gather of other rows' caches, no mask)."""
        B = x.shape[0]
        if self.qkv_proj is not None and self.q_norm is None:
            qkv = self.qkv_proj(x).view(B, -1)
        else:
            qkv = torch.cat([t.reshape(B, -1) for t in self.project(x)], dim=-1)
        k_cache, v_cache = cache.buffers(layer, batch.kv_len)
        out = torch.ops.cake.decode_attention(qkv, k_cache, v_cache, batch.slots,
                                              batch.positions, inv_freq, self.n_heads,
                                              window or 0)
        return self.o_proj(out.view(B, 1, -1))

    def forward(self, x, cos, sin, mask, batch: StepBatch, cache: KVCache, layer: int):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = cache.update(layer, batch, k, v)  # [B, L, n_kv, head_dim]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a float16 cache of a float32 model
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.gate_up_proj = None  # gate and up as one matrix, once fuse() has run

    def fuse(self) -> None:
        fused = quant.fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            return self.down_proj(quant.silu_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, window: Optional[int]):
        super().__init__()
        self.window = window
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.kernel_args = None

    def forward(self, x, cos, sin, mask, batch, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, batch, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, inv_freq, batch, cache, layer):
        """One new token per row, x [B, 1, dim], through our CPU kernels."""
        if self.kernel_args is None:
            x = x + self.self_attn.decode(self.input_layernorm(x), inv_freq, self.window, batch,
                                          cache, layer)
            return x + self.mlp(self.post_attention_layernorm(x))
        k_cache, v_cache = cache.buffers(layer, batch.kv_len)
        B = x.shape[0]
        return self._decode_layer(x.view(B, -1), *self.kernel_args, k_cache, v_cache,
                                  batch.slots, batch.positions.view(-1), inv_freq,
                                  self.self_attn.n_heads, self.window or 0,
                                  self.input_layernorm.eps).view(B, 1, -1)

    def prepare_kernel(self) -> None:
        """Arguments of the one-call decoder layer kernel, when every matrix is quantized and
        q/k/v and gate/up are fused (after loading; else decoding goes op by op)."""
        attn, mlp = self.self_attn, self.mlp
        mats = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        self.kernel_args = None
        if not all(isinstance(m, quant.QuantLinear) for m in mats):
            return
        if self.input_layernorm.weight.dtype != torch.float32:
            return
        norm = (lambda n: None if n is None else n.weight)  # noqa: E731
        self.kernel_args = (
            self.input_layernorm.weight, *mats[0].kernel_args(), norm(attn.q_norm),
            norm(attn.k_norm), *mats[1].kernel_args(), self.post_attention_layernorm.weight,
            *mats[2].kernel_args(), *mats[3].kernel_args())
        self._decode_layer = torch.ops.cake.decode_layer.default


class Model(nn.Module):
    """Decoder layers [start, end) of the model, plus the embeddings when start == 0 and the
    final norm and head when end == num_hidden_layers. Parameter names match the checkpoint
    (model.layers.N.… with the global layer number N)."""

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
        self.model.layers = nn.ModuleDict({str(i): TransformerBlock(args, args.window(i))
                                           for i in range(start, end)})
        if self.is_last:
            self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            # A tied head on the stage that holds the embeddings is the embedding itself;
            # a later stage gets its own copy, loaded from model.embed_tokens.weight.
            tied_here = args.tie_word_embeddings and self.is_first
            self.lm_head = None if tied_here else nn.Linear(
                args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        # Fixed before loading swaps or fuses modules: the checkpoint's names for this stage,
        # and how each parameter is held (the loader notes quantized ones).
        self._tensor_names = [self.checkpoint_name(n) for n, _ in self.named_parameters()]
        self._shapes = {n: list(p.shape) for n, p in self.named_parameters()}
        self.quantized: dict[str, tuple[str, int]] = {}  # name -> (type, bytes)

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

    def fuse_projections(self) -> None:
        """Join q/k/v and gate/up into one matrix each (after loading)."""
        for layer in self.model.layers.values():
            layer.self_attn.fuse()
            layer.mlp.fuse()
            if next(self.parameters()).device.type == "cpu" and quant.available():
                layer.prepare_kernel()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, T, 1, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

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
        if self.kernel_decode(x, cache):
            for i, layer in self.model.layers.items():
                x = layer.decode(x, self.inv_freq, batch, cache, int(i))
        else:
            cos, sin = self.rope(batch.positions, x.dtype)
            windows = {layer.window for layer in self.model.layers.values()}
            masks = {w: self.attention_mask(batch, w) for w in windows}
            for i, layer in self.model.layers.items():
                x = layer(x, cos, sin, masks[layer.window], batch, cache, int(i))
        if not self.is_last:
            return x
        if logits_at is not None and x.shape[1] > 1:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]
        elif logits_at is not None:
            x = x[:, 0]
        return self.head(self.model.norm(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(x)
        embed = self.model.embed_tokens
        if isinstance(embed, quant.QuantEmbedding):
            return embed.table(x)
        return F.linear(x, embed.weight)

    @staticmethod
    def kernel_decode(x: torch.Tensor, cache: KVCache) -> bool:
        """Single-token steps on CPU in float32 take our kernel path."""
        return (x.shape[1] == 1 and x.device.type == "cpu" and x.dtype == torch.float32
                and cache.dtype in (torch.float32, torch.float16) and quant.available())

    @torch.no_grad()
    def load_tensors(self, get_tensor) -> None:
        """Fill parameters from a checkpoint: get_tensor(name) -> torch.Tensor. (Quantized
        modules hold buffers, not parameters: they were filled when they were made.)"""
        for name, p in self.named_parameters():
            t = get_tensor(self.checkpoint_name(name))
            if t.shape != p.shape:
                raise ValueError(f"{name}: checkpoint has shape {tuple(t.shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(t)
