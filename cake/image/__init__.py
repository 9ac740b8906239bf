"""Image generation: Stable Diffusion and FLUX pipelines through diffusers."""
