"""Image models on the command line: Cake's flags, loading, and `cake run` to a PNG file."""
from __future__ import annotations

import logging
import sys

from cake.image.arch import ARCH_CHOICES, SD_VERSIONS

log = logging.getLogger(__name__)


def add_args(p) -> None:
    g = p.add_argument_group("image models (--model-type image-model)")
    g.add_argument("--image-model-arch", choices=ARCH_CHOICES, default=None,
                   help="sd, flux1 (FLUX.1), flux2 (FLUX.2-klein) or flux (either FLUX); "
                   "default: read from model_index.json")
    g.add_argument("--sd-version", choices=list(SD_VERSIONS), default=None,
                   help="Stable Diffusion version: its defaults, and its Hub repo when no "
                   "model is named")
    g.add_argument("--sd-width", type=int, help="Stable Diffusion image width")
    g.add_argument("--sd-height", type=int, help="Stable Diffusion image height")
    g.add_argument("--flux-width", type=int, help="FLUX image width")
    g.add_argument("--flux-height", type=int, help="FLUX image height")
    g.add_argument("--n-steps", "--sd-n-steps", "--flux-steps", dest="n_steps", type=int,
                   help="denoising steps (default: the model's, e.g. 4 for FLUX.2-klein)")
    g.add_argument("--guidance-scale", "--sd-guidance-scale", "--flux-guidance",
                   dest="guidance_scale", type=float, help="default: the model's")
    g.add_argument("--image-seed", "--sd-seed", dest="image_seed", type=int,
                   help="default seed of every image (default: random per request)")
    g.add_argument("--image-config", metavar="DIR_OR_REPO",
                   help="single .safetensors checkpoint: the diffusers folder or Hub repo whose "
                   "configs (and the models the file lacks) it uses; default: inferred")
    g.add_argument("--image-output", default="image.png",
                   help="`cake run`: where to write the PNG")


def load(args):
    from cake.image.arch import ArchMismatch, describe
    from cake.image.generator import ImageModel
    from cake.image.loader import load_pipeline, resolve
    from cake.text.loader import DTYPES
    from cake.device import best_device, default_dtype

    ref = resolve(args.model, args.sd_version)
    device = args.device or best_device()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    try:
        cluster = None
        if getattr(args, "cluster", None):  # components named in --topology go to workers
            from cake.image.cluster import start_cluster
            cluster = start_cluster(ref.path, args.cluster, device, dtype)
        pipe = load_pipeline(ref.path, args.image_model_arch, args.sd_version, device, dtype,
                             components=cluster.stand_ins() if cluster else None,
                             image_config=args.image_config)
        arch = describe(pipe, args.sd_version, ref.model_id)
        flux = arch.is_flux
        defaults = dict(width=args.flux_width if flux else args.sd_width,
                        height=args.flux_height if flux else args.sd_height,
                        steps=args.n_steps, guidance=args.guidance_scale, seed=args.image_seed)
        if cluster:
            from cake.image.cluster import ClusterImageModel
            return ClusterImageModel(pipe, arch, ref.model_id, cluster, **defaults)
        return ImageModel(pipe, arch, ref.model_id, **defaults)
    except (ArchMismatch, ValueError) as e:  # (a started cluster's head ends with us)
        raise SystemExit(f"cake: {e}")


def run(model, args) -> None:
    """Render args.prompt with the server defaults and write the PNG."""
    from pathlib import Path

    try:
        job = model.job(args.prompt)
    except ValueError as e:
        raise SystemExit(f"cake: {e}")
    (png,) = model.generate(job)  # here, in this thread: nothing else waits
    Path(args.image_output).write_bytes(png)
    print(f"cake: wrote {args.image_output} ({job.width}x{job.height}, seed {job.seed})",
          file=sys.stderr)
