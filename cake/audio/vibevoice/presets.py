"""VibeVoice-Realtime voice presets: the caches of a voice prompt already run through the
model (Microsoft ships them as .pt files, e.g. en-Carter_man.pt), read without running an
arbitrary pickle.

A preset file is torch.save of {"lm", "tts_lm", "neg_lm", "neg_tts_lm"}, each a transformers
ModelOutput holding last_hidden_state [1, L, D] and a DynamicCache. It is read with
torch.load(weights_only=True), where only tensors, containers and the stand-ins below may be
built: each stand-in takes the place of one of those classes and keeps its fields as plain
data, so nothing of transformers or vibevoice runs while loading.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch


def _model_output(*fields) -> OrderedDict:
    # A ModelOutput pickles as its class called with its fields, then its items set by
    # name: a plain OrderedDict receives the named items (the positional ones repeat them).
    return OrderedDict()


class _Cache:
    """A DynamicCache's attributes: key_cache / value_cache lists of [1, n_kv, L, head_dim]
    (transformers 4.51, Microsoft's presets), or layers of _Layer (transformers 5)."""


class _Layer:
    """A DynamicLayer's attributes: keys, values."""


STAND_INS = [(_model_output, f"{module}.{name}") for module, name in [
    ("transformers.modeling_outputs", "BaseModelOutputWithPast"),
    ("transformers.modeling_outputs", "CausalLMOutputWithPast"),
    ("vibevoice.modular.modeling_vibevoice_streaming_inference", "VibeVoiceCausalLMOutputWithPast"),
]] + [(_Cache, "transformers.cache_utils.DynamicCache"),
      (_Layer, "transformers.cache_utils.DynamicLayer")]


class PresetError(ValueError):
    pass


@dataclass
class Prompt:
    """One model's part of a preset: its keys and values per layer [n_kv, L, head_dim] and the
    hidden state of the prompt's last position [D]."""
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    last_hidden: torch.Tensor

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[1]


@dataclass
class VoicePreset:
    lm: Prompt  # the text LM's prompt
    tts: Prompt  # the TTS LM's, the voice's speech included
    neg_tts: Prompt  # the TTS LM's unconditional branch


def _prompt(part, name: str) -> Prompt:
    if not isinstance(part, dict) or "last_hidden_state" not in part:
        raise PresetError(f"{name} has no last_hidden_state")
    cache = part.get("past_key_values", part.get("cache"))  # transformers 5 renamed it
    state = getattr(cache, "__dict__", {})
    if "key_cache" in state:
        pairs = list(zip(state["key_cache"], state["value_cache"]))
    elif "layers" in state:
        pairs = [(layer.keys, layer.values) for layer in state["layers"]]
    else:
        raise PresetError(f"{name} has no cache of keys and values")
    hidden = part["last_hidden_state"]
    tensors = [t for pair in pairs for t in pair] + [hidden]
    if not pairs or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise PresetError(f"{name}: the cache holds no tensors")
    if any(t.dim() != 4 or t.shape[0] != 1 for t in tensors[:-1]) or hidden.dim() != 3:
        raise PresetError(f"{name}: keys and values must be [1, heads, length, head_dim]")
    return Prompt([(k[0].float(), v[0].float()) for k, v in pairs], hidden[0, -1].float())


def load_preset(path: Path) -> VoicePreset:
    try:
        with torch.serialization.safe_globals(STAND_INS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names the class it refused
        raise PresetError(f"voice preset {path.name} cannot be read safely: {e}") from None
    if not isinstance(data, dict) or not {"lm", "tts_lm", "neg_tts_lm"} <= set(data):
        raise PresetError(f"voice preset {path.name} lacks lm, tts_lm or neg_tts_lm")
    return VoicePreset(*(_prompt(data[k], f"{path.name} {k}") for k in ("lm", "tts_lm",
                                                                         "neg_tts_lm")))
