"""Model families, one file each, built from the shared blocks. A family module has `Model` and
`configure(cfg, fields)` (what its config.json says beyond the common fields)."""
from types import ModuleType

from cake.text.models import exaone4, gemma3, llama, olmo2, phi3, qwen3_5, qwen3_moe, smollm3

# config.json "model_type" -> module implementing the family. SmolLM2 and Falcon3 ship as
# model_type "llama".
FAMILIES = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama,
            "gemma3_text": gemma3, "phi3": phi3, "olmo2": olmo2, "exaone4": exaone4,
            "smollm3": smollm3, "qwen3_moe": qwen3_moe, "qwen3_5_text": qwen3_5,
            "qwen3_5_moe_text": qwen3_5}


def family(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model architecture {model_type!r}; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def model_class(config: dict):
    return family(config.get("model_type", "llama")).Model
