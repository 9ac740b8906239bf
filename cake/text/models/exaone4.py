"""EXAONE 4: OLMo 2's post-norms with per-head q/k norm; with a sliding window, sliding layers
(3 of every 4 by default, or a pattern like "LLLG") use rope and the global ones none."""
from cake.text.models.args import periodic_layer_types
from cake.text.models.decoder import Model  # noqa: F401


def configure(cfg: dict, fields: dict) -> None:
    fields.update(norms="post", qk_norm="head")
    n, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    types = cfg.get("layer_types")
    pattern = cfg.get("sliding_window_pattern", 4)
    if window is None:
        types = None
    elif types is None and isinstance(pattern, str):
        types = ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention"
                 for i in range(n)]
    elif types is None:
        types = periodic_layer_types(n, pattern)
    fields["layer_types"] = types
    if window is not None:
        fields["rope_layers"] = [t == "sliding_attention" for t in types]
