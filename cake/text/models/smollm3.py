"""SmolLM3: the Llama block with no rope in every 4th layer (no_rope_layers, 0 = NoPE), and a
window over its NoPE layers when use_sliding_window says so."""
from cake.text.models.decoder import Model  # noqa: F401


def configure(cfg: dict, fields: dict) -> None:
    n = cfg["num_hidden_layers"]
    rope = cfg.get("no_rope_layers") or [
        int((i + 1) % cfg.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    fields["rope_layers"] = [bool(r) for r in rope]
    if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        fields["sliding_window"], fields["layer_types"] = None, None
    elif fields["layer_types"] is None:
        fields["layer_types"] = ["full_attention" if r else "sliding_attention" for r in rope]
