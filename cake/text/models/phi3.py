"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini: the Llama block with fused qkv and gate_up matrices in
the checkpoint, longrope, partial rotary (Phi-4-mini) and a window over every layer when set."""
from cake.text.models.decoder import Model  # noqa: F401


def configure(cfg: dict, fields: dict) -> None:
    fields["fused_checkpoint"] = True
    scaling = fields["rope_scaling"]
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in ("su", "yarn"):
        scaling["rope_type"] = "longrope"  # Phi-3's old names for it (as transformers reads)
