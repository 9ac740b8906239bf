"""The Llama family: Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2/2.5, Qwen3, Falcon3: the shared
decoder with pre-norms and SwiGLU, by config flags (qkv bias, q/k norm, sliding window, rope
scaling, tied embeddings)."""
from cake.text.models.decoder import Model, rope_inv_freq  # noqa: F401
from cake.text.models.args import ModelArgs  # noqa: F401
from cake.text.models.rope import rotate_half  # noqa: F401


def configure(cfg: dict, fields: dict) -> None:
    model_type = fields["model_type"]
    if model_type == "qwen2":  # biases on q, k, v only
        fields["attention_bias"], fields["qkv_bias"] = False, True
    if model_type == "qwen3":
        fields["qk_norm"] = "head"
    if model_type in ("qwen2", "qwen3"):
        # Qwen slides only when asked, and only in layers >= max_window_layers.
        if not cfg.get("use_sliding_window", False):
            fields["sliding_window"], fields["layer_types"] = None, None
        elif fields["layer_types"] is None:
            fields["layer_types"] = [
                "sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
                for i in range(cfg["num_hidden_layers"])]
