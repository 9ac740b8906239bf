"""Gemma 3 (text): GeGLU, (1 + w) RMSNorms before and after attention and the MLP, q/k norm,
embeddings scaled by sqrt(hidden), sliding layers with their own rope base between global
ones (every 6th by default), a score scale of query_pre_attn_scalar, optional final-logit
softcapping."""
from cake.text.models.args import periodic_layer_types, rope_of
from cake.text.models.decoder import Model  # noqa: F401


def configure(cfg: dict, fields: dict) -> None:
    fields.update(
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        norms="sandwich", norm_plus_one=True, qk_norm="head",
        embed_scale=cfg["hidden_size"] ** 0.5,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        layer_types=cfg.get("layer_types") or periodic_layer_types(
            cfg["num_hidden_layers"], cfg.get("sliding_window_pattern", 6)))
    if "sliding_attention" in (cfg.get("rope_parameters") or {}):  # transformers 5
        theta, scaling, _ = rope_of(cfg, "sliding_attention")
    else:  # older configs: rope_theta/rope_scaling are the global layers'
        theta, scaling = float(cfg.get("rope_local_base_freq", 10000.0)), None
    fields["rope_local"] = {"rope_theta": theta, "rope_scaling": scaling}
