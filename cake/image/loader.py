"""Find an image checkpoint (diffusers folder, single .safetensors file, Hub repo) and load
it as a diffusers pipeline on the chosen device and dtype."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
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
    Cake's evilsocket/flux1-dev) as its .safetensors file; progress bars from the hub. With
    HF_HUB_OFFLINE=1 the cached copy serves, whichever of the two it is."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        try:
            hf_hub_download(repo_id, "model_index.json")
        except RemoteEntryNotFoundError:
            files = [f for f in HfApi().list_repo_files(repo_id) if f.endswith(".safetensors")]
            return Path(hf_hub_download(repo_id, one_checkpoint(repo_id, files)))
        except LocalEntryNotFoundError:  # offline: model_index.json may just not exist
            folder = Path(snapshot_download(repo_id, local_files_only=True))
            if (folder / "model_index.json").exists():
                return folder
            files = [f.name for f in folder.glob("*.safetensors")]
            return folder / one_checkpoint(repo_id, files)
        return Path(DiffusionPipeline.download(repo_id))
    except (LocalEntryNotFoundError, RepositoryNotFoundError) as e:
        raise hub.ModelNotFound(f"cannot get {repo_id}: {e}") from e


def one_checkpoint(repo_id: str, files: list[str]) -> str:
    if len(files) != 1:
        raise hub.ModelNotFound(f"{repo_id} has no model_index.json and {len(files)} "
                                ".safetensors files; download the one you want and pass its path")
    return files[0]


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
    """Whether the denoiser (FLUX transformer or SD UNet) of a single file is stored in FP8."""
    from safetensors import safe_open

    from cake.image.flux_keys import flux_transformer_keys

    with safe_open(str(path), "pt") as f:
        return any(f.get_slice(name).get_dtype() == "F8_E4M3"
                   for name in flux_transformer_keys(f.keys()))


def load_pipeline(path: Path, arch_flag: Optional[str], sd_version: Optional[str],
                  device: str, dtype: torch.dtype, components: Optional[dict] = None,
                  image_config: Optional[str] = None):
    """components: modules to use in place of loading those (stand-ins for remote ones);
    image_config: where a single file's configs come from (see load_single_file)."""
    import diffusers

    if path.is_file():
        pipe = load_single_file(path, arch_flag, sd_version, dtype, image_config)
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
        kwargs.update(components or {})
        pipe = getattr(diffusers, cls).from_pretrained(path, dtype=dtype, **kwargs)
    return pipe.to(device)


# What marks each model of a pipeline as present in a single file (key prefixes).
IN_FILE = {
    "FluxPipeline": {"transformer": ("model.diffusion_model.", "double_blocks."),
                     "vae": ("vae.", "first_stage_model."),
                     "text_encoder": ("text_encoders.clip_l.",),
                     "text_encoder_2": ("text_encoders.t5xxl.",)},
    "StableDiffusionPipeline": {"unet": ("model.diffusion_model.",),
                                "vae": ("first_stage_model.",),
                                "text_encoder": ("cond_stage_model.",)},
    "StableDiffusionXLPipeline": {"unet": ("model.diffusion_model.",),
                                  "vae": ("first_stage_model.",),
                                  "text_encoder": ("conditioner.embedders.0.",),
                                  "text_encoder_2": ("conditioner.embedders.1.",)},
}
FLUX_MARK = "double_blocks.0.img_attn.norm.key_norm.scale"


class TensorShapes(Mapping):
    """A checkpoint's names and shapes without reading its tensors: enough for diffusers'
    infer_diffusers_model_type, which picks the Hub repo a file's configs come from."""

    def __init__(self, f):
        self.f, self.names = f, list(f.keys())

    def __getitem__(self, name):
        return SimpleNamespace(shape=torch.Size(self.f.get_slice(name).get_shape()))

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __contains__(self, name):
        return name in self.names


def single_file_pipeline(names: list[str], arch_flag: Optional[str],
                         sd_version: Optional[str]) -> str:
    if any(n.endswith(FLUX_MARK) for n in names):
        check_flag(arch_flag, "FluxPipeline")
        return "FluxPipeline"
    if arch_flag in ("flux", "flux1", "flux2"):
        raise hub.ModelNotFound(f"cannot load a {arch_flag} model from this single file (it "
                                "holds no FLUX.1 transformer); use its diffusers folder")
    if not any(n.startswith("model.diffusion_model.input_blocks.") for n in names):
        raise hub.ModelNotFound("cake reads FLUX.1 and Stable Diffusion single files; this one "
                                "holds neither a FLUX.1 transformer nor an SD UNet (LDM names)")
    xl = sd_version in ("xl", "turbo") or any(n.startswith("conditioner.") for n in names)
    return "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"


def config_folder(config: str, path: Path, cls: str, needed: list[str]) -> Path:
    """--image-config as a local folder: the configs, tokenizers and scheduler, plus the
    weights of the models the single file lacks (`needed`), fetched from the Hub if a repo."""
    from huggingface_hub import snapshot_download

    lacks = f" and its {', '.join(needed)}, which the file lacks" if needed else ""
    hint = (f"pass --image-config DIR_OR_REPO, a diffusers folder or Hub repo of the same "
            f"model, for {path.name}'s configs{lacks}")
    folder = Path(config).expanduser()
    if not folder.is_dir():
        if not hub.looks_like_repo_id(config):
            raise hub.ModelNotFound(f"--image-config {config!r} is neither a folder nor a Hub "
                                    "repo id")
        patterns = ["*.json", "*/*.json", "*.txt", "*/*.txt", "*/*.model"]
        try:
            folder = Path(snapshot_download(config, allow_patterns=patterns +
                                            [f"{name}/*" for name in needed]))
        except OSError as e:  # offline and not cached, gated, missing, unreachable
            raise hub.ModelNotFound(f"cannot get the configs of {config} ({type(e).__name__}: "
                                    f"{e}); {hint}") from e
    index = model_index(folder)
    if index["_class_name"] != cls:
        raise hub.ModelNotFound(f"{folder} holds a {index['_class_name']}, but {path.name} is "
                                f"a {cls}; {hint}")
    return folder


def load_part(folder: Path, name: str, dtype: torch.dtype, path: Path):
    """A model the single file lacks, from the config folder."""
    import importlib

    library, cls = model_index(folder)[name]
    try:
        return getattr(importlib.import_module(library), cls).from_pretrained(
            folder, subfolder=name, dtype=dtype)
    except OSError as e:
        raise hub.ModelNotFound(f"{path.name} holds no {name} and {folder} has no {name} "
                                f"weights either ({e})") from e


def flux_transformer(path: Path, folder: Path, dtype: torch.dtype):
    """The file's FLUX.1 transformer. FP8 weights go straight into FP8 storage (computing in
    `dtype`), so FLUX.1-dev never exists in full precision while it loads."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    from cake.image.flux_keys import bfl_to_diffusers, flux_transformer_keys

    with safe_open(str(path), "pt") as f:
        state = {n: f.get_tensor(n) for n in flux_transformer_keys(f.keys())}
    config = FluxTransformer2DModel.load_config(folder, subfolder="transformer")
    state = bfl_to_diffusers(state, config)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config).to(dtype)
    if any(t.dtype == torch.float8_e4m3fn for t in state.values()):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    wanted = model.state_dict()
    if state.keys() != wanted.keys():
        raise ValueError(f"{path.name}'s transformer does not match {folder}'s config: missing "
                         f"{sorted(wanted.keys() - state.keys())[:5]}, unexpected "
                         f"{sorted(state.keys() - wanted.keys())[:5]}")
    model.load_state_dict({k: t.to(wanted[k].dtype) for k, t in state.items()}, assign=True)
    return model.eval()


def load_single_file(path: Path, arch_flag: Optional[str], sd_version: Optional[str],
                     dtype: torch.dtype, image_config: Optional[str] = None):
    """A single checkpoint file: FLUX.1 (Black Forest Labs' transformer-only file, or
    Comfy-Org's all-in-one transformer + CLIP-L + T5 + VAE, possibly FP8) or Stable
    Diffusion (original LDM layout). Configs, tokenizers, scheduler and the models the file
    lacks come from `image_config` (a diffusers folder or repo), by default from the Hub
    repo diffusers infers from the file's tensors."""
    import diffusers
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        default_config = fetch_diffusers_config(TensorShapes(f))["pretrained_model_name_or_path"]
    cls = single_file_pipeline(names, arch_flag, sd_version)
    if cls != "FluxPipeline" and image_config is None and sd_version:
        default_config = SD_VERSIONS[sd_version]
    needed = [name for name, prefixes in IN_FILE[cls].items()
              if not any(n.startswith(prefixes) for n in names)]
    folder = config_folder(image_config or default_config, path, cls, needed)
    parts = {name: load_part(folder, name, dtype, path) for name in needed}
    flux = cls == "FluxPipeline"
    if flux:  # loaded below, once diffusers has let go of its copy of the whole file
        parts["transformer"] = None
    pipe = getattr(diffusers, cls).from_single_file(str(path), config=str(folder), dtype=dtype,
                                                    **parts)
    if flux:  # diffusers' own converter only knows FLUX.1's width
        pipe.register_modules(transformer=flux_transformer(path, folder, dtype))
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # diffusers leaves a T5 read from the file in training mode (dropout)
            if any(p.is_meta for p in module.parameters()):
                module.tie_weights()  # its embed_tokens is shared.weight, absent from the file
    if not flux and stores_fp8(path):  # keep the UNet's weights in FP8, compute in `dtype`
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    return pipe
