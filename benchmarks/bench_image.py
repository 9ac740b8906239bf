"""Image generation: seconds per denoising step, cake's image worker against a plain diffusers
call on the very same pipeline object, in the same run.

    python benchmarks/bench_image.py                      # tiny pipelines, every family
    python benchmarks/bench_image.py --size small         # wider random pipelines, 256x256
    python benchmarks/bench_image.py --arch flux1 --device cuda --dtype bf16

Weights are random (nothing is downloaded). The cost of one denoising step is measured as a
difference, (T(long) - T(short)) / (long - short steps): prompt encoding, VAE decoding, PNG
encoding and the queue hop cancel out, so both sides are measured the same way. Runs
alternate between the two sides; medians of --repeats. The last line is one JSON object with
diffusers' step time / cake's step time per family (>= 1.0 means cake is not slower).
Both sides draw diffusers' progress bar on stderr, as they do by default.
"""
from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cake.testing import tiny_images as tiny  # noqa: E402
from cake.image.arch import describe  # noqa: E402
from cake.image.generator import ImageModel  # noqa: E402


def small_pipeline(arch: str):
    """The tiny families made wider (hundreds of channels) with an 8x VAE like the real ones,
    so a step is real arithmetic over a realistic number of latent pixels."""
    from diffusers import (AutoencoderKL, AutoencoderKLFlux2, Flux2Transformer2DModel,
                           FluxTransformer2DModel, UNet2DConditionModel)

    def config_of(module) -> dict:  # without diffusers' note of which values were defaults
        return {k: v for k, v in module.config.items() if k != "_use_default_values"}

    pipe = tiny.BUILDERS[arch]()
    vae_cls = AutoencoderKLFlux2 if arch == "flux2" else AutoencoderKL
    vae = config_of(pipe.vae)
    vae.update(block_out_channels=(32, 64, 128, 128), norm_num_groups=32, layers_per_block=1,
               down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    pipe.vae = vae_cls.from_config(vae)  # the pipeline's scale factors follow on reload
    if arch in ("sd", "sdxl"):
        config = config_of(pipe.unet)
        config.update(block_out_channels=(64, 128, 256), norm_num_groups=32,
                      down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                      up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                      attention_head_dim=(2, 4, 8) if arch == "sdxl" else 8,
                      transformer_layers_per_block=(1, 1, 1) if arch == "sdxl" else 1)
        pipe.unet = UNet2DConditionModel.from_config(config)
    else:
        config = config_of(pipe.transformer)
        config.update(num_layers=2, num_single_layers=4, attention_head_dim=64,
                      num_attention_heads=4,
                      axes_dims_rope=[16, 24, 24] if arch == "flux1" else [16, 16, 16, 16])
        cls = FluxTransformer2DModel if arch == "flux1" else Flux2Transformer2DModel
        pipe.transformer = cls.from_config(config)
    return pipe


def load(arch: str, size: str, device: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    torch.manual_seed(0)
    pipe = tiny.BUILDERS[arch]() if size == "tiny" else small_pipeline(arch)
    with tempfile.TemporaryDirectory() as folder:  # through disk, as cake serve loads it
        pipe.save_pretrained(folder)
        return DiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)


def plain_diffusers(pipe, steps: int, side: int, seed: int, guidance: float) -> float:
    start = time.perf_counter()
    pipe(prompt="a rusty robot on a beach", num_inference_steps=steps, height=side, width=side,
         guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed))
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cake_worker(model: ImageModel, steps: int, side: int, seed: int) -> float:
    start = time.perf_counter()
    job = model.job("a rusty robot on a beach", width=side, height=side, steps=steps, seed=seed)
    done = queue.Queue()
    model.submit(job, done.put)  # the path a request takes: queue, worker thread, PNG
    if (end := done.get()).error is not None:
        raise end.error
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=tiny.ARCHS, action="append")
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--side", type=int, help="image side (default: 64 tiny, 256 small)")
    ap.add_argument("--steps", type=int, nargs=2, default=(2, 22), metavar=("SHORT", "LONG"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    side = args.side or (64 if args.size == "tiny" else 256)
    short, long = args.steps
    ratios = {}
    for arch in args.arch or list(tiny.ARCHS):
        pipe = load(arch, args.size, args.device, dtype)
        model = ImageModel(pipe, describe(pipe, None, arch), arch, width=side, height=side)
        sides = {"diffusers": lambda n, s: plain_diffusers(pipe, n, side, s, model.guidance),
                 "cake": lambda n, s: cake_worker(model, n, side, s)}
        for run in sides.values():  # warm-up: first calls pay for allocations and kernels
            run(short, 0)
        per_step = {name: [] for name in sides}
        for rep in range(args.repeats):
            for name, run in sides.items():  # alternate, so drifts in load hit both
                per_step[name].append((run(long, rep) - run(short, rep)) / (long - short))
        model.close()
        med = {name: statistics.median(v) for name, v in per_step.items()}
        ratios[arch] = round(med["diffusers"] / med["cake"], 3)
        print(f"{arch:6s} {args.size} {side}x{side} {args.device} {args.dtype}: "
              f"diffusers {med['diffusers'] * 1000:8.2f} ms/step  "
              f"cake {med['cake'] * 1000:8.2f} ms/step  ratio {ratios[arch]:.3f}", flush=True)
    print(json.dumps({"bench": "image", "size": args.size, "side": side, "device": args.device,
                      "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "diffusers_over_cake": ratios}))


if __name__ == "__main__":
    main()
