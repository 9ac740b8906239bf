"""Qwen3.5, dense and MoE (qwen3_5_text, qwen3_5_moe_text; the Hub's multimodal qwen3_5 /
qwen3_5_moe checkpoints serve their language model, see weights.py): Gated DeltaNet layers
(models/deltanet.py) with a full-attention layer every full_attention_interval-th (q/k norm,
partial rope, a sigmoid gate on attention's output), (1 + w) RMSNorms, and in the MoE model
the sparse MLP with a gated shared expert in every layer. Positions are text-only: the
multimodal rope's three position streams are equal, which is plain (partial) rope."""
from __future__ import annotations

from cake.text.linear_state import states_of
from cake.text.models import decoder
from cake.text.models.blocks import TransformerBlock
from cake.text.models.deltanet import LinearAttentionBlock
from cake.text.models.moe import (MoEBlock, SparseMoE, decode_attention_half,
                                  prepare_attention_kernel)


def configure(cfg: dict, fields: dict) -> None:
    n = cfg["num_hidden_layers"]
    interval = cfg.get("full_attention_interval", 4)
    fields.update(
        norm_plus_one=True, qk_norm="head", attn_output_gate=True, sliding_window=None,
        layer_types=cfg.get("layer_types") or [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(n)],
        linear=dict(conv_kernel=cfg["linear_conv_kernel_dim"],
                    key_heads=cfg["linear_num_key_heads"],
                    value_heads=cfg["linear_num_value_heads"],
                    key_dim=cfg["linear_key_head_dim"], value_dim=cfg["linear_value_head_dim"],
                    value_heads_tiled=bool(cfg.get("linear_value_heads_tiled", False))))
    if fields["model_type"] == "qwen3_5_moe_text":  # top-k weights always renormalized
        fields.update(num_experts=cfg["num_experts"],
                      num_experts_per_tok=cfg["num_experts_per_tok"],
                      moe_intermediate_size=cfg["moe_intermediate_size"],
                      shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0),
                      norm_topk_prob=True)


class Model(decoder.Model):
    # Each sequence's DeltaNet state sums up its whole prefix: no cached prefix can stand in.
    prefix_reusable = False

    def block(self, i, tables):
        a = self.args
        if a.layer_types[i] == "linear_attention":
            return LinearAttentionBlock(a, SparseMoE(a) if a.num_experts else None)
        if a.num_experts:
            return MoEBlock(a, None, self.layer_rope(i, tables))
        return GatedAttentionBlock(a, None, self.layer_rope(i, tables))

    def release_sequence(self, slot, cache):
        states_of(cache).release(slot)

    def plus_one(self, name: str) -> bool:
        return super().plus_one(name) and not name.endswith("linear_attn.norm.weight")


class GatedAttentionBlock(TransformerBlock):
    """The dense model's full-attention block: decoding runs its gated attention through
    decode_attention_block (the one-call layer kernel has no output gate), the MLP op by op."""

    attention_args = None

    def decode(self, x, ropes, batch, cache, layer):
        x = decode_attention_half(self, x, ropes, batch, cache, layer)
        return x + self._norm(3, self.mlp(self._norm(2, x)))

    def prepare_kernel(self) -> None:
        self.kernel_args = None
        prepare_attention_kernel(self)
