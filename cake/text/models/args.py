"""ModelArgs: the fields of config.json a decoder uses, read from either form found on the Hub:
transformers 5's (rope_parameters, per layer type where layers differ, and layer_types) and
the older one (rope_theta, rope_scaling, sliding_window_pattern, use_sliding_window, ...).
Each family file adds what only it has through its `configure(cfg, fields)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelArgs:
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
    # Sliding layers' own rope where it differs from the global layers' (Gemma 3).
    rope_local: Optional[dict] = None  # {"rope_theta": ..., "rope_scaling": ...}
    partial_rotary_factor: float = 1.0
    rope_layers: Optional[list[bool]] = None  # False where a layer has no rope (NoPE)
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q, k, v and o (Llama option)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    qk_norm: Optional[str] = None  # "head": RMSNorm per head (Qwen3); "proj": whole (OLMo 2)
    query_pre_attn_scalar: Optional[float] = None  # scores scaled by its -1/2, not head_dim's
    sliding_window: Optional[int] = None
    layer_types: Optional[list[str]] = None  # per layer "sliding_attention"/"full_attention"
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (GeGLU)
    norms: str = "pre"  # "pre" (Llama), "post" (OLMo 2, EXAONE 4), "sandwich" (Gemma 3)
    norm_plus_one: bool = False  # checkpoint norms hold w for a (1 + w) RMSNorm (Gemma)
    embed_scale: Optional[float] = None  # embeddings times this (Gemma: sqrt(hidden))
    final_logit_softcapping: Optional[float] = None
    fused_checkpoint: bool = False  # the checkpoint has qkv_proj / gate_up_proj (Phi-3)
    # Mixture of experts (Qwen3-MoE, Qwen3.5-MoE): see models/moe.py.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Gated DeltaNet layers ("linear_attention" in layer_types; Qwen3.5): see models/deltanet.py.
    linear: Optional[dict] = None  # conv_kernel, key_heads, value_heads, key_dim, value_dim
    attn_output_gate: bool = False  # q_proj also yields a sigmoid gate on attention's output
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        from cake.text.models import family

        model_type = cfg.get("model_type", "llama")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        theta, scaling, partial = rope_of(cfg)
        fields = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg.get("intermediate_size", 0),  # MoE-only models have none
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            attention_bias=bool(cfg.get("attention_bias", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=cfg.get("sliding_window"),
            layer_types=cfg.get("layer_types"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
            eos_token_id=eos,
            bos_token_id=cfg.get("bos_token_id"),
        )
        family(model_type).configure(cfg, fields)
        return cls(**fields)

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of a layer, None where it attends to the whole sequence."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window or None

    def kv_layers(self, start: int, end: int) -> list[int]:
        """The layers of [start, end) that keep keys and values (a linear-attention layer
        keeps a fixed-size state instead: the KV cache has no room for it)."""
        return [i for i in range(start, end)
                if self.layer_types is None or self.layer_types[i] != "linear_attention"]

    def has_rope(self, layer: int) -> bool:
        return self.rope_layers is None or bool(self.rope_layers[layer])


def rope_of(cfg: dict, layer_type: str = "full_attention") -> tuple[float, Optional[dict], float]:
    """(theta, scaling or None, partial_rotary_factor) of a layer type, from rope_parameters
    (transformers 5; nested by layer type where types differ) or rope_theta/rope_scaling."""
    rope = dict(cfg.get("rope_parameters") or {})
    if layer_type in rope or "full_attention" in rope:
        rope = dict(rope.get(layer_type) or rope.get("full_attention") or {})
    scaling = {k: v for k, v in (cfg.get("rope_scaling") or rope).items()
               if k not in ("rope_theta", "partial_rotary_factor")}
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    partial = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None, float(partial)
    scaling.setdefault("original_max_position_embeddings",
                       cfg.get("original_max_position_embeddings"))
    return float(theta), scaling, float(partial)


def periodic_layer_types(n_layers: int, period: int) -> list[str]:
    """Every period-th layer global, the others sliding (Gemma 3's 6, EXAONE 4's 4)."""
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
            for i in range(n_layers)]
