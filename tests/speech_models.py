"""Tiny random speech checkpoints in Microsoft's original VibeVoice layout, for tests and
benchmarks: VibeVoice-Realtime built from cake's own module tree, its tensors renamed back to
the original names (the reference implementation loads them strictly:
tests/reference/vibevoice_realtime.py)."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

# Written here from the original module tree (vibevoice/modular/*.py): SConv1d wraps
# NormConv1d wraps nn.Conv1d (conv.conv.*), Block1D's mixer is a Convlayer around an SConv1d,
# the stem is downsample_layers.0 / upsample_layers.0 and stages.0, connectors are
# fc1/norm/fc2, the diffusion head has t_embedder.mlp and adaLN_modulation Sequentials.
def original_name(name: str) -> str:
    def tower(m):
        prefix, part, rest = m[1], m[2], m[3]
        conv = "upsample_layers" if part == "decoder" else "downsample_layers"
        rest = re.sub(r"^stem\.conv\.conv\.", f"{conv}.0.0.conv.conv.", rest)
        rest = re.sub(r"^stem\.stage\.", "stages.0.", rest)
        rest = re.sub(r"^conv_layers\.(\d+)\.conv\.conv\.",
                      lambda n: f"{conv}.{int(n[1]) + 1}.0.conv.conv.", rest)
        rest = re.sub(r"^conv_layers\.(\d+)\.convtr\.convtr\.",
                      lambda n: f"{conv}.{int(n[1]) + 1}.0.convtr.convtr.", rest)
        rest = re.sub(r"^conv_layers\.(\d+)\.stage\.", lambda n: f"stages.{int(n[1]) + 1}.", rest)
        rest = rest.replace(".mixer.conv.", ".mixer.conv.conv.conv.")
        rest = re.sub(r"^head\.conv\.", "head.conv.conv.", rest)
        return f"{prefix}.{part}.{rest}"

    name = re.sub(r"^model\.audio_tower\.(encoder|decoder)\.(.*)$",
                  lambda m: tower(re.match(r"(.*)\.(encoder|decoder)\.(.*)",
                                           f"model.acoustic_tokenizer.{m[1]}.{m[2]}")), name)
    name = re.sub(r"^model\.semantic_tokenizer_encoder\.(.*)$",
                  lambda m: tower(re.match(r"(.*)\.(encoder)\.(.*)",
                                           f"model.semantic_tokenizer.encoder.{m[1]}")), name)
    for new, old in (("multi_modal_projector", "acoustic_connector"),
                     ("semantic_connector", "semantic_connector")):
        for a, b in (("linear_1", "fc1"), ("act", "norm"), ("linear_2", "fc2")):
            name = name.replace(f"model.{new}.{a}.", f"model.{old}.{b}.")
    name = name.replace("model.diffusion_head.", "model.prediction_head.")
    name = name.replace(".timestep_proj.fc1.", ".t_embedder.mlp.0.")
    name = name.replace(".timestep_proj.fc2.", ".t_embedder.mlp.2.")
    name = re.sub(r"\.layers\.(\d+)\.linear\.", r".layers.\1.adaLN_modulation.1.", name)
    name = name.replace(".final_layer.linear_1.", ".final_layer.adaLN_modulation.1.")
    name = name.replace(".final_layer.linear_2.", ".final_layer.linear.")
    return {"model.latent_scaling_factor": "model.speech_scaling_factor",
            "model.latent_bias_factor": "model.speech_bias_factor"}.get(name, name)


# --- VibeVoice-Realtime ----------------------------------------------------------------------
REALTIME_SEED = 0


def realtime_config(vocab_size: int) -> dict:
    """A tiny config.json in the original layout: 2 text LM + 2 TTS LM layers of width 64,
    an acoustic decoder of hop 8 * 5 * 4 = 160 samples."""
    return {
        "model_type": "vibevoice_streaming",
        "tts_backbone_num_hidden_layers": 2,
        "acoustic_vae_dim": 16,
        "decoder_config": {
            "model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 8192, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
            "use_sliding_window": False},
        "acoustic_tokenizer_config": {
            "vae_dim": 16, "encoder_n_filters": 8, "decoder_n_filters": 8,
            "encoder_ratios": [8, 5, 4], "encoder_depths": "1-1-1-1", "fix_std": 0.5,
            "std_dist_type": "gaussian", "causal": True, "mixer_layer": "depthwise_conv",
            "layernorm": "RMSNorm", "layernorm_eps": 1e-5, "disable_last_norm": True,
            "conv_bias": True, "layer_scale_init_value": 1.0},
        "diffusion_head_config": {
            "hidden_size": 64, "head_layers": 2, "head_ffn_ratio": 2.0, "rms_norm_eps": 1e-5,
            "latent_size": 16, "prediction_type": "v_prediction", "diffusion_type": "ddpm",
            "ddpm_num_steps": 1000, "ddpm_num_inference_steps": 5,
            "ddpm_beta_schedule": "cosine"},
    }


def random_state(names_shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Weights of a working scale, drawn in name order from one seeded generator: norms near
    one, matrices ~ 1/sqrt(fan_in), other vectors small."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(names_shapes):
        shape = names_shapes[name]
        noise = torch.randn(shape, generator=gen)
        if len(shape) >= 2:
            state[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif re.search(r"(norm|\.act)\.weight$", name):
            state[name] = 1.0 + 0.1 * noise
        else:
            state[name] = 0.05 * noise
    return state


def real_realtime_config(vocab_size: int) -> dict:
    """VibeVoice-Realtime-0.5B's shape: Qwen2.5-0.5B cut 4 + 20, VibeVoice's acoustic decoder
    (hop 3200) and a 4-layer diffusion head."""
    cfg = realtime_config(vocab_size)
    cfg["tts_backbone_num_hidden_layers"] = 20
    cfg["acoustic_vae_dim"] = 64
    cfg["decoder_config"].update(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rope_theta=1000000.0, max_window_layers=24,
        sliding_window=32768, rope_scaling=None, attention_dropout=0.0, use_cache=True)
    cfg["acoustic_tokenizer_config"].update(
        vae_dim=64, encoder_n_filters=32, decoder_n_filters=32, encoder_ratios=[8, 5, 5, 4, 2, 2],
        encoder_depths="3-3-3-3-3-3-8", layer_scale_init_value=1e-6)
    cfg["diffusion_head_config"].update(hidden_size=896, head_layers=4, head_ffn_ratio=3.0,
                                        latent_size=64)
    return cfg


def write_realtime(folder: Path, seed: int = REALTIME_SEED, real_size: bool = False) -> str:
    """A tiny random VibeVoice-Realtime checkpoint (original layout) with its tokenizer, or
    one of the real shape (real_size); its end-of-speech classifier never fires. Returns the
    sha256 of its weights file."""
    from safetensors.torch import save_file

    from cake.testing.tiny_vibevoice import write_tokenizer
    from cake.audio.vibevoice.realtime import RealtimeModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder)
    cfg = (real_realtime_config if real_size else realtime_config)(tokenizer.get_vocab_size())
    shapes = {k: tuple(v.shape) for k, v in RealtimeModel(cfg).state_dict().items()}
    state = random_state(shapes, seed)
    state["model.latent_scaling_factor"] = torch.tensor(0.8)
    state["model.latent_bias_factor"] = torch.tensor(0.1)
    state["tts_eos_classifier.fc2.bias"] = torch.tensor([-8.0])
    save_file({original_name(k): v for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


if __name__ == "__main__":  # python tests/speech_models.py FOLDER: the checkpoint the
    import sys             # reference script runs (tests/reference/vibevoice_realtime.py)

    print(write_realtime(Path(sys.argv[1])))
