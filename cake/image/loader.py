"""Find an image checkpoint (diffusers folder, single .safetensors file, Hub repo) and load
it as a diffusers pipeline on the chosen device and dtype."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from cake import hub
from cake.image.arch import FAMILIES, SD_VERSIONS, check_flag

NO_MODEL = ("no image model given, and cake has no embedded default image model. Name one: a "
            "diffusers folder, a .safetensors checkpoint or a Hub repo id (e.g. `cake serve "
            "stabilityai/sdxl-turbo --model-type image-model`), or pick Stable Diffusion with "
            f"--sd-version ({', '.join(SD_VERSIONS)})")


def resolve(ref: Optional[str], sd_version: Optional[str] = None) -> hub.ModelRef:
    """What the user named -> a local folder or file (downloading a repo into the HF cache)."""
    if not ref:
        if not sd_version:
            raise hub.ModelNotFound(NO_MODEL)
        ref = SD_VERSIONS[sd_version]
    path = Path(ref).expanduser()
    if path.exists():
        return hub.ModelRef(path.stem if path.is_file() else path.resolve().name, path)
    if hub.looks_like_repo_id(ref):
        return hub.ModelRef(ref, download(ref))
    raise hub.ModelNotFound(f"{ref!r} is neither a local diffusers folder, a .safetensors file, "
                            "nor a Hugging Face repo id (owner/name)")


def download(repo_id: str) -> Path:
    """A diffusers repo (model_index.json) as a folder, or a single-checkpoint repo (such as
    Cake's evilsocket/flux1-dev) as its .safetensors file; progress bars from the hub."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        try:
            hf_hub_download(repo_id, "model_index.json")
        except RemoteEntryNotFoundError:
            files = [f for f in HfApi().list_repo_files(repo_id) if f.endswith(".safetensors")]
            if len(files) != 1:
                raise hub.ModelNotFound(f"{repo_id} has no model_index.json and "
                                        f"{len(files)} .safetensors files; download the one "
                                        "you want and pass its path")
            return Path(hf_hub_download(repo_id, files[0]))
        return Path(DiffusionPipeline.download(repo_id))
    except (LocalEntryNotFoundError, RepositoryNotFoundError) as e:
        raise hub.ModelNotFound(f"cannot get {repo_id}: {e}") from e


def model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.exists():
        raise hub.ModelNotFound(f"{folder} has no model_index.json: not a diffusers pipeline")
    return json.loads(index.read_text())


def fp16_only(folder: Path) -> bool:
    """Some folders ship only the half-precision variant of the weights."""
    weights = list(folder.glob("*/*.safetensors"))
    return bool(weights) and all(".fp16." in w.name for w in weights)


def stores_fp8(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(f.get_slice(name).get_dtype() == "F8_E4M3" for name in f.keys()
                   if name.startswith("model.diffusion_model."))


def load_pipeline(path: Path, arch_flag: Optional[str], sd_version: Optional[str],
                  device: str, dtype: torch.dtype):
    import diffusers

    if path.is_file():
        pipe = load_single_file(path, arch_flag, sd_version, dtype)
    else:
        index = model_index(path)
        cls = index["_class_name"]
        check_flag(arch_flag, cls)
        if cls not in FAMILIES:
            raise hub.ModelNotFound(f"{path} holds a {cls}; cake serves "
                                    f"{', '.join(sorted(FAMILIES))}")
        kwargs = {}
        if "safety_checker" in index:  # Cake has no safety checker either
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if fp16_only(path):
            kwargs["variant"] = "fp16"
        pipe = getattr(diffusers, cls).from_pretrained(path, dtype=dtype, **kwargs)
    return pipe.to(device)


def load_single_file(path: Path, arch_flag: Optional[str], sd_version: Optional[str],
                     dtype: torch.dtype):
    """A single checkpoint file: FLUX.1 (Comfy-Org style, transformer + CLIP-L + T5 + VAE in
    one file, possibly FP8) or Stable Diffusion. diffusers fetches the configs that the
    file lacks from the matching Hub repo."""
    import diffusers

    if arch_flag in ("flux", "flux1") or (arch_flag is None and "flux" in path.name.lower()):
        pipe = diffusers.FluxPipeline.from_single_file(str(path), dtype=dtype)
        if stores_fp8(path):  # keep the transformer's weights in FP8, compute in `dtype`
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                      compute_dtype=dtype)
        return pipe
    if arch_flag in (None, "sd"):
        cls = ("StableDiffusionXLPipeline" if sd_version in ("xl", "turbo")
               else "StableDiffusionPipeline")
        return getattr(diffusers, cls).from_single_file(str(path), dtype=dtype)
    raise hub.ModelNotFound(f"cannot load a {arch_flag} model from the single file {path}; "
                            "use its diffusers folder")
