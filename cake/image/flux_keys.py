"""FLUX.1 transformer weights from Black Forest Labs' original names to diffusers' names.

diffusers' own converter (convert_flux_transformer_checkpoint_to_diffusers) hard-codes
FLUX.1's width (3072) when it splits the single blocks' fused projection; this one reads the
width from the transformer's config, so it also loads narrower FLUX-shaped checkpoints.
"""
from __future__ import annotations

import re

import torch

COMFY_PREFIX = "model.diffusion_model."

# BFL module -> diffusers module, outside the blocks
TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
}
SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out",
          "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
# fused BFL projections -> the diffusers projections they hold, in order
FUSED = {
    ("double", "img_attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("double", "txt_attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("single", "linear1"): ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale); diffusers' is (scale, shift)."""
    first, second = t.chunk(2)
    return torch.cat([second, first])


def flux_transformer_keys(names) -> list[str]:
    """The transformer's tensors among a file's names: Comfy-Org's all-in-one files prefix
    them with model.diffusion_model., BFL's own files hold nothing else."""
    names = list(names)
    if any(n.startswith(COMFY_PREFIX) for n in names):
        return [n for n in names if n.startswith(COMFY_PREFIX)]
    return names


def bfl_to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out = {}
    for key, t in state.items():
        module, leaf = key.removeprefix(COMFY_PREFIX).rsplit(".", 1)
        leaf = "weight" if leaf == "scale" else leaf  # RMSNorm scales
        block = BLOCK.fullmatch(module)
        if block is None:
            if module not in TOP:
                raise ValueError(f"{key} is not a FLUX.1 transformer weight")
            final_modulation = module == "final_layer.adaLN_modulation.1"
            out[f"{TOP[module]}.{leaf}"] = swap_halves(t) if final_modulation else t
            continue
        kind, i, rest = block.groups()
        prefix = f"{'' if kind == 'double' else 'single_'}transformer_blocks.{i}."
        if (kind, rest) in FUSED:
            names = FUSED[kind, rest]
            sizes = [inner] * 3 + [t.shape[0] - 3 * inner] * (len(names) - 3)
            for name, part in zip(names, t.split(sizes)):
                out[f"{prefix}{name}.{leaf}"] = part
            continue
        table = DOUBLE if kind == "double" else SINGLE
        if rest not in table:
            raise ValueError(f"{key} is not a FLUX.1 transformer weight")
        out[f"{prefix}{table[rest]}.{leaf}"] = t
    return out
