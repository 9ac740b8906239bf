"""The image architectures cake serves, what tells them apart, and their defaults.

A diffusers folder names its pipeline class in model_index.json; that is the ground truth.
--image-model-arch only checks it (or picks the class for a single-file checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Cake's --sd-version values and the Hub repos they name.
SD_VERSIONS = {
    "v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "v2-1": "stabilityai/stable-diffusion-2-1",
    "xl": "stabilityai/stable-diffusion-xl-base-1.0",
    "turbo": "stabilityai/sdxl-turbo",
}
ARCH_CHOICES = ("sd", "flux", "flux1", "flux2")

# diffusers pipeline class -> family
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sd",
    "FluxPipeline": "flux1",
    "Flux2KleinPipeline": "flux2",
    "Flux2Pipeline": "flux2",
}


@dataclass(frozen=True)
class Arch:
    family: str  # "sd", "flux1" or "flux2"
    pipeline_class: str  # the diffusers class that runs it
    label: str  # for people: "Stable Diffusion XL", "FLUX.1-dev", ...
    steps: int  # default denoising steps
    guidance: float  # default guidance scale

    @property
    def is_flux(self) -> bool:
        return self.family.startswith("flux")


class ArchMismatch(ValueError):
    pass


def check_flag(arch_flag: Optional[str], pipeline_class: str) -> None:
    """--image-model-arch, when given, must agree with the checkpoint."""
    family = FAMILIES.get(pipeline_class)
    if arch_flag is None:
        return
    if family is None:
        raise ArchMismatch(f"this checkpoint is a {pipeline_class}; cake serves "
                           f"{', '.join(sorted(FAMILIES))}")
    ok = arch_flag == family or (arch_flag == "flux" and family.startswith("flux"))
    if not ok:
        raise ArchMismatch(f"--image-model-arch {arch_flag} was given, but the checkpoint is a "
                           f"{pipeline_class} ({family})")


def describe(pipe, sd_version: Optional[str], model_id: str) -> Arch:
    """The architecture of a loaded pipeline, with its defaults (steps, guidance)."""
    cls = type(pipe).__name__
    family = FAMILIES.get(cls)
    if family is None:
        raise ArchMismatch(f"{model_id} is a {cls}; cake serves {', '.join(sorted(FAMILIES))}")
    if family == "sd":
        xl = cls == "StableDiffusionXLPipeline"
        version = sd_version or ("turbo" if xl and "turbo" in model_id.lower() else
                                 "xl" if xl else "v1-5")
        if version == "turbo":  # adversarially distilled: one step, no guidance
            return Arch(family, cls, "SDXL Turbo", 1, 0.0)
        label = "Stable Diffusion XL" if xl else "Stable Diffusion"
        return Arch(family, cls, label, 30, 7.5)
    if family == "flux1":
        # dev is guidance-distilled (guidance is an input); schnell is timestep-distilled.
        if pipe.transformer.config.guidance_embeds:
            return Arch(family, cls, "FLUX.1-dev", 28, 3.5)
        return Arch(family, cls, "FLUX.1-schnell", 4, 0.0)
    if getattr(pipe.config, "is_distilled", False):
        return Arch(family, cls, "FLUX.2-klein", 4, 1.0)
    return Arch(family, cls, "FLUX.2" if cls == "Flux2Pipeline" else "FLUX.2-klein base", 50, 4.0)


def size_multiple(pipe, arch: Arch) -> int:
    """Image sides must be multiples of this: the VAE's downscale, times 2 for FLUX, whose
    latents are packed in 2x2 patches."""
    return pipe.vae_scale_factor * (2 if arch.is_flux else 1)


def natural_size(pipe, arch: Arch) -> tuple[int, int]:
    """The size the model was trained at (width, height), as diffusers computes it."""
    if arch.family == "sd" and arch.pipeline_class == "StableDiffusionPipeline":
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    else:
        side = pipe.default_sample_size * pipe.vae_scale_factor
    return side, side
