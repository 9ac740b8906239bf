"""VibeVoice checkpoints: transformers' layout loads as is; Microsoft's original layout
(microsoft/VibeVoice-1.5B, Cake's evilsocket/VibeVoice-1.5B) is converted on load, config and
tensor names both, into transformers' VibeVoiceForConditionalGeneration.

Original module tree (vibevoice/modular/*.py)          transformers 5.24 module tree
  model.acoustic_tokenizer.encoder/decoder (SConv1d      model.audio_tower.encoder/decoder
    wraps NormConv1d wraps Conv1d: conv.conv.*)            (CausalConv1d wraps Conv1d: conv.*)
    downsample_layers.0 / upsample_layers.0 (stem)         stem.conv
    downsample_layers.i / upsample_layers.i, i >= 1        conv_layers.{i-1}.conv / .convtr
    stages.0 / stages.i                                    stem.stage / conv_layers.{i-1}.stage
    head                                                   head
  model.semantic_tokenizer.encoder                       model.semantic_tokenizer_encoder
  model.acoustic_connector.fc1/norm/fc2                  model.multi_modal_projector.linear_1/act/linear_2
  model.semantic_connector.fc1/norm/fc2                  model.semantic_connector.linear_1/act/linear_2
  model.prediction_head.t_embedder.mlp.0/.2              model.diffusion_head.timestep_proj.fc1/fc2
  model.prediction_head.layers.N.adaLN_modulation.1      model.diffusion_head.layers.N.linear
  model.prediction_head.final_layer.adaLN_modulation.1   model.diffusion_head.final_layer.linear_1
  model.prediction_head.final_layer.linear               model.diffusion_head.final_layer.linear_2
  model.speech_scaling_factor / speech_bias_factor       model.latent_scaling_factor / latent_bias_factor
  model.language_model.*, lm_head.weight                 unchanged
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

# (pattern, replacement) applied in order to each original tensor name; a replacement may
# be a function of the match (to shift stage numbers by one where the stem is split off).
_CONV = r"(?:downsample|upsample)_layers"
TENSOR_RENAMES: list[tuple[str, object]] = [
    (r"^model\.acoustic_tokenizer\.", "model.audio_tower."),
    (r"^model\.semantic_tokenizer\.encoder\.", "model.semantic_tokenizer_encoder."),
    # Tokenizer convolutions: drop the NormConv1d / SConv1d wrapper levels.
    (rf"\.{_CONV}\.0\.0\.conv\.conv\.", ".stem.conv.conv."),
    (rf"\.{_CONV}\.(\d+)\.0\.conv\.conv\.",
     lambda m: f".conv_layers.{int(m[1]) - 1}.conv.conv."),
    (rf"\.{_CONV}\.(\d+)\.0\.convtr\.convtr\.",
     lambda m: f".conv_layers.{int(m[1]) - 1}.convtr.convtr."),
    (r"\.stages\.0\.", ".stem.stage."),
    (r"\.stages\.(\d+)\.", lambda m: f".conv_layers.{int(m[1]) - 1}.stage."),
    (r"\.mixer\.conv\.conv\.conv\.", ".mixer.conv."),
    (r"\.head\.conv\.conv\.", ".head.conv."),
    # Connectors.
    (r"^model\.acoustic_connector\.", "model.multi_modal_projector."),
    (r"(projector|connector)\.fc1\.", r"\1.linear_1."),
    (r"(projector|connector)\.norm\.", r"\1.act."),
    (r"(projector|connector)\.fc2\.", r"\1.linear_2."),
    # Diffusion head.
    (r"^model\.prediction_head\.", "model.diffusion_head."),
    (r"\.t_embedder\.mlp\.0\.", ".timestep_proj.fc1."),
    (r"\.t_embedder\.mlp\.2\.", ".timestep_proj.fc2."),
    (r"\.(layers\.\d+)\.adaLN_modulation\.1\.", r".\1.linear."),
    (r"\.final_layer\.adaLN_modulation\.1\.", ".final_layer.linear_1."),
    (r"\.final_layer\.linear\.", ".final_layer.linear_2."),
    # Latent normalisation.
    (r"^model\.speech_scaling_factor$", "model.latent_scaling_factor"),
    (r"^model\.speech_bias_factor$", "model.latent_bias_factor"),
]


def convert_name(name: str) -> str:
    for pattern, repl in TENSOR_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {convert_name(k): v for k, v in original.items()}


def tokenizer_config(cfg: dict, with_decoder: bool) -> dict:
    """An original acoustic/semantic tokenizer config -> transformers' field names."""
    depths = cfg.get("encoder_depths", "3-3-3-3-3-3-8")
    if isinstance(depths, str):
        depths = [int(d) for d in depths.split("-")]
    out = {
        "model_type": "vibevoice_acoustic_tokenizer" if with_decoder
        else "vibevoice_acoustic_tokenizer_encoder",
        "channels": cfg.get("channels", 1),
        "hidden_size": cfg.get("vae_dim", 64),
        "num_filters": cfg.get("encoder_n_filters", 32),
        # The original lists the decoder's (upsampling) order and reverses it for the encoder.
        "downsampling_ratios": list(reversed(cfg.get("encoder_ratios", [8, 5, 5, 4, 2, 2]))),
        "depths": depths,
        "rms_norm_eps": cfg.get("layernorm_eps", 1e-5),
        "layer_scale_init_value": cfg.get("layer_scale_init_value", 1e-6),
    }
    if with_decoder:
        # The original's "gaussian" sampling draws the noise scale from N(0, fix_std / 0.8).
        out["vae_std"] = cfg.get("fix_std", 0.5) / 0.8
    return out


def convert_config(cfg: dict) -> dict:
    """An original config.json -> keyword arguments of transformers' VibeVoiceConfig."""
    decoder = dict(cfg["decoder_config"])
    decoder.pop("torch_dtype", None)
    return {
        "text_config": decoder,
        "audio_config": tokenizer_config(cfg["acoustic_tokenizer_config"], with_decoder=True),
        "semantic_model_config": tokenizer_config(cfg["semantic_tokenizer_config"],
                                                  with_decoder=False),
        "diffusion_head_config": head_config(cfg, decoder["hidden_size"]),
    }


def head_config(cfg: dict, hidden: int) -> dict:
    """An original diffusion_head_config -> transformers' VibeVoiceDiffusionHeadConfig fields."""
    head = cfg.get("diffusion_head_config", {})
    return {
        "num_hidden_layers": head.get("head_layers", 4),
        "intermediate_size": int(head.get("head_ffn_ratio", 3.0) * hidden),
        "rms_norm_eps": head.get("rms_norm_eps", 1e-5),
    }


def scheduler_config(cfg: dict) -> dict:
    """diffusers DPMSolverMultistepScheduler arguments, from either layout's config."""
    head = cfg.get("diffusion_head_config", {})
    schedule = head.get("ddpm_beta_schedule", "cosine")
    return {
        "num_train_timesteps": head.get("ddpm_num_steps", 1000),
        "beta_schedule": "squaredcos_cap_v2" if schedule == "cosine" else schedule,
        "prediction_type": head.get("prediction_type", "v_prediction"),
    }


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class UnsupportedCheckpoint(ValueError):
    pass


def load_model(folder: Path, dtype: torch.dtype, device: str):
    """The checkpoint in `folder` as transformers' VibeVoiceForConditionalGeneration, in
    eval mode, plus the diffusers scheduler arguments and whether it was converted."""
    from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

    cfg = json.loads((folder / "config.json").read_text())
    kind = cfg.get("model_type")
    if kind != "vibevoice":  # vibevoice_streaming loads through realtime.py
        raise UnsupportedCheckpoint(f"{folder}: model_type {kind!r} is not VibeVoice")
    original = "decoder_config" in cfg
    if original:
        config = VibeVoiceConfig(**convert_config(cfg))
        state = convert_state_dict(read_safetensors(folder))
        model = VibeVoiceForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state, dtype=dtype)
        check_loaded(model, state)
    else:
        model = VibeVoiceForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval(), scheduler_config(cfg), original


def check_loaded(model, state: dict) -> None:
    """Every parameter of the model came from the checkpoint (the tied head aside), and
    every checkpoint tensor found a place: a wrong mapping fails here, not as noise."""
    expected = set(model.state_dict())
    config = getattr(model, "config", None)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - set(state) - tied)
    unused = sorted(set(state) - expected)
    if missing or unused:
        raise UnsupportedCheckpoint(
            "the checkpoint does not match VibeVoice's layout: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unused[:5]}{'...' if len(unused) > 5 else ''}")


def find_tokenizer(folder: Path) -> Path:
    """tokenizer.json beside the weights, else that of the language model the checkpoint
    names (the original checkpoints ship none and name Qwen2.5's)."""
    local = folder / "tokenizer.json"
    if local.exists():
        return local
    base: Optional[str] = None
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        base = json.loads(pre.read_text()).get("language_model_pretrained_name")
    if not base:
        raise FileNotFoundError(f"{folder} has no tokenizer.json and names no language model "
                                "(preprocessor_config.json language_model_pretrained_name)")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(base, "tokenizer.json"))
