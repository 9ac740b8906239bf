"""A LuxTTS folder as on the Hub: config.json ({"model": ..., "feature": ...}), tokens.txt,
model.pt (or model.safetensors) for the flow model, vocoder/config.yaml + vocoder/vocos.bin.
The .pt/.bin files are read with torch.load(weights_only=True): tensors only, no pickled code.
(The ONNX exports the folder also holds are not used.)"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cake.audio.luxtts.flow import FlowModel
from cake.audio.luxtts.text import read_tokens
from cake.audio.luxtts.vocoder import Vocoder


class CheckpointError(ValueError):
    pass


def is_luxtts(folder: Path) -> bool:
    """k2-fsa's layout: tokens.txt, and a config.json with "model" and "feature" sections."""
    config = folder / "config.json"
    if not (folder / "tokens.txt").is_file() or not config.is_file():
        return False
    try:
        cfg = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and "model" in cfg and "feature" in cfg


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickler refusal names the offending global
        raise CheckpointError(f"{path} is not a tensors-only checkpoint ({e}); cake will "
                              "not unpickle arbitrary objects") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # k2-fsa's trainer saves {"model": state_dict, ...}
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def _load_into(module: torch.nn.Module, state: dict, what: str, ignore=()) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore))}
    missing, unexpected = module.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("istft.window")]
    if missing or unexpected:
        raise CheckpointError(f"{what} does not fit the configured model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")


def vocoder_config(path: Path) -> dict:
    import yaml

    cfg = yaml.safe_load(path.read_text())
    try:
        parts = {k: dict(cfg[k].get("init_args", {}))
                 for k in ("backbone", "head", "upsampler", "head_48k")}
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: expected backbone, head, upsampler and head_48k "
                              "sections (LinaCodec's 48 kHz Vocos)") from None
    backbone = parts["backbone"]
    for key in ("layer_scale_init_value", "adanorm_num_embeddings"):
        if backbone.pop(key, None) is not None and key == "adanorm_num_embeddings":
            raise CheckpointError(f"{path}: an AdaLN Vocos backbone is not supported")
    return parts


def load(folder: Path, device: str = "cpu", dtype=torch.float32):
    """(flow model, vocoder, tokens, config) from a LuxTTS folder."""
    cfg = json.loads((folder / "config.json").read_text())
    try:
        tokens = read_tokens(folder / "tokens.txt")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    weights = next((folder / n for n in ("model.safetensors", "model.pt")
                    if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder} has neither model.pt nor model.safetensors (cake runs "
                              "the PyTorch weights, not the ONNX exports)")
    flow = FlowModel(cfg["model"], vocab_size=len(tokens), pad_id=tokens["_"])
    _load_into(flow, _tensors(weights), str(weights))
    voc_dir = folder / "vocoder"
    voc_weights = next((voc_dir / n for n in ("vocos.safetensors", "vocos.bin")
                        if (voc_dir / n).is_file()), None)
    if not (voc_dir / "config.yaml").is_file() or voc_weights is None:
        raise CheckpointError(f"{folder} has no vocoder/config.yaml with vocoder/vocos.bin")
    vocoder = Vocoder(**vocoder_config(voc_dir / "config.yaml"))
    _load_into(vocoder, _tensors(voc_weights), str(voc_weights), ignore=("feature_extractor.",))
    return (flow.to(device, dtype).eval(), vocoder.to(device).eval(), tokens, cfg)
