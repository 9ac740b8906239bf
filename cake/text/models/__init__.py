"""Model families, one file each. model_class picks one from a config.json dict."""
from cake.text.models import llama

# config.json "model_type" -> module implementing the family. SmolLM2 and Falcon3 ship as
# model_type "llama".
FAMILIES = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama}


def model_class(config: dict):
    kind = config.get("model_type", "llama")
    if kind not in FAMILIES:
        raise ValueError(f"unsupported model architecture {kind!r}; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[kind].Model
