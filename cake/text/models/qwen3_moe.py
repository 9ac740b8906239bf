"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's block (per-head q/k norm) with the
sparse MLP of models/moe.py in every decoder_sparse_step-th layer outside mlp_only_layers."""
from __future__ import annotations

from cake.text.models import decoder
from cake.text.models.moe import MoEBlock, moe_layer


def configure(cfg: dict, fields: dict) -> None:
    fields.update(
        qk_norm="head", num_experts=cfg.get("num_experts") or cfg.get("num_local_experts", 0),
        num_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
        mlp_only_layers=list(cfg.get("mlp_only_layers") or []))
    if not cfg.get("use_sliding_window", False):
        fields["sliding_window"], fields["layer_types"] = None, None


class Model(decoder.Model):
    def block(self, i, tables):
        if not moe_layer(self.args, i):
            return super().block(i, tables)
        return MoEBlock(self.args, self.args.window(i), self.layer_rope(i, tables))
