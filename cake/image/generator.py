"""A loaded image model: one diffusers pipeline behind a queue.

A diffusers pipeline keeps per-call state on itself, so it renders one request at a time:
jobs run on a SerialWorker (cake/jobs.py), which keeps the server's event loop free. A
cancelled job stops between denoising steps (its step callback raises).
"""
from __future__ import annotations

import inspect
import io
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from cake.image.arch import Arch, natural_size, size_multiple
from cake.jobs import Cancelled, Job, SerialWorker

log = logging.getLogger(__name__)

MAX_IMAGES = 10  # per request, as OpenAI's n
MAX_SIDE = 2048
MAX_STEPS = 1000
SEED_SPACE = 2**64  # torch.Generator.manual_seed takes 64-bit seeds

_job_ids = itertools.count(1)


@dataclass
class ImageJob(Job):
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int  # image i of the job uses seed + i
    count: int = 1  # images in all
    batch: int = 1  # images per pipeline call
    negative_prompt: str = ""
    init_image: Optional[object] = None  # PIL image for img2img
    strength: float = 0.8
    id: int = field(default_factory=lambda: next(_job_ids))


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def accepts(pipe, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


class ImageModel:
    def __init__(self, pipe, arch: Arch, model_id: str, *, width: Optional[int] = None,
                 height: Optional[int] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None, seed: Optional[int] = None):
        self.pipe, self.arch, self.model_id = pipe, arch, model_id
        self.multiple = size_multiple(pipe, arch)
        natural_w, natural_h = natural_size(pipe, arch)
        self.width, self.height = width or natural_w, height or natural_h
        self.check_size(self.width, self.height)
        self.steps = steps or arch.steps
        self.guidance = arch.guidance if guidance is None else guidance
        self.seed = seed
        self._img2img = None
        self._counts = dict(images=0, steps=0)
        self.worker = SerialWorker(self.generate, "image")

    # -- validation: ValueError messages are shown to the client as they are

    def check_size(self, width: int, height: int) -> None:
        m = self.multiple
        for name, side in (("width", width), ("height", height)):
            if not m <= side <= MAX_SIDE or side % m:
                raise ValueError(f"{name} {side} is not accepted by {self.arch.label}: sides "
                                 f"must be multiples of {m} from {m} to {MAX_SIDE}")

    def job(self, prompt: str, *, width: Optional[int] = None, height: Optional[int] = None,
            steps: Optional[int] = None, guidance: Optional[float] = None,
            seed: Optional[int] = None, count: int = 1, batch: Optional[int] = None,
            negative_prompt: str = "", init_image=None, strength: float = 0.8) -> ImageJob:
        """A checked job: the request's values over the server's defaults."""
        if not prompt or not prompt.strip():
            raise ValueError("prompt must not be empty")
        batch = count if batch is None else batch
        if not 1 <= count <= MAX_IMAGES:
            raise ValueError(f"the number of images must be from 1 to {MAX_IMAGES}, not {count}")
        if not 1 <= batch <= count:
            raise ValueError(f"the batch size must be from 1 to {count}, not {batch}")
        width = self.width if width is None else width
        height = self.height if height is None else height
        self.check_size(width, height)
        steps = self.steps if steps is None else steps
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be from 1 to {MAX_STEPS}, not {steps}")
        guidance = self.guidance if guidance is None else guidance
        if not 0 <= guidance <= 100:
            raise ValueError(f"guidance scale must be from 0 to 100, not {guidance}")
        if seed is None:
            seed = self.seed if self.seed is not None else random.randrange(SEED_SPACE)
        if not 0 <= seed < SEED_SPACE:
            raise ValueError(f"seed must be from 0 to {SEED_SPACE - 1}")
        if negative_prompt and self.arch.family != "sd":
            raise ValueError(f"{self.arch.label} takes no negative prompt (Stable Diffusion does)")
        if init_image is not None:
            if not 0 < strength <= 1:
                raise ValueError(f"img2img strength must be in (0, 1], not {strength}")
            # FLUX.2 takes a reference image, with limits its image processor checks
            check_reference = getattr(self.pipe.image_processor, "check_image_input", None)
            if check_reference is not None:
                check_reference(init_image)
            elif int(steps * strength) < 1:
                raise ValueError(f"img2img runs steps x strength = {steps * strength:g} "
                                 "denoising steps; raise one of them to run at least one")
        return ImageJob(prompt, width, height, steps, guidance, seed, count, batch,
                        negative_prompt, init_image, strength)

    # -- the queue

    def submit(self, job: ImageJob, on_event) -> ImageJob:
        """Queue a job; its last event is a Done with the PNGs (bytes) as result."""
        return self.worker.submit(job, on_event)

    def stats(self) -> dict:
        return {**self.worker.stats(), **self._counts}

    def close(self) -> None:
        self.worker.close()

    # -- rendering (worker thread, or the caller's thread for `cake run`)

    def img2img_pipeline(self):
        if self._img2img is None:  # shares the loaded components: no extra memory
            from diffusers import AutoPipelineForImage2Image

            self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
        return self._img2img

    def generate(self, job: ImageJob) -> list[bytes]:
        if job.cancelled:
            raise Cancelled(f"image {job.id} cancelled before it started")
        pipe = self.pipe if job.init_image is None else self.img2img_pipeline()
        done = 0

        def on_step(pipe, step, timestep, tensors):
            nonlocal done
            done += 1
            self._counts["steps"] += 1
            if job.cancelled:
                raise Cancelled(f"image {job.id} cancelled after {done} steps")
            return {}

        args = dict(prompt=job.prompt, num_inference_steps=job.steps,
                    guidance_scale=job.guidance, callback_on_step_end=on_step)
        if accepts(pipe, "height"):
            args.update(height=job.height, width=job.width)
        if job.negative_prompt:
            args["negative_prompt"] = job.negative_prompt
        if job.init_image is not None:
            image = job.init_image.convert("RGB")
            # img2img starts from the image: at the output size. FLUX.2 takes it as a
            # reference, which its pipeline fits itself.
            args["image"] = image if self.arch.family == "flux2" else image.resize(
                (job.width, job.height))
            if accepts(pipe, "strength"):
                args["strength"] = job.strength
        log.info("image %d: %dx%d, %d image(s), %d steps, guidance %g, seed %d", job.id,
                 job.width, job.height, job.count, job.steps, job.guidance, job.seed)
        pipe.set_progress_bar_config(**{**getattr(pipe, "_progress_bar_config", {}),
                                        "desc": f"image {job.id}"})
        pngs = []
        try:
            for first in range(0, job.count, job.batch):
                n = min(job.batch, job.count - first)
                # One CPU generator per image: the same noise on every device and batch size.
                seeds = [(job.seed + first + i) % SEED_SPACE for i in range(n)]
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                with torch.inference_mode():  # lighter than the no_grad diffusers uses
                    out = pipe(**args, num_images_per_prompt=n, generator=generators)
                pngs += [png_bytes(image) for image in out.images]
        except Cancelled:
            log.info("image %d cancelled after %d steps", job.id, done)
            raise
        self._counts["images"] += len(pngs)
        return pngs

    # -- /api/v1/topology

    def topology(self) -> dict:
        from cake.cluster.topology import DTYPE_NAMES, node

        details = {}
        for name, module in self.pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            tensors = [{"name": f"{name}.{k}", "short_name": k,
                        "dtype": DTYPE_NAMES.get(t.dtype, str(t.dtype)), "shape": list(t.shape),
                        "size_bytes": t.numel() * t.element_size()}
                       for k, t in module.state_dict().items()]
            details[name] = {"total_bytes": sum(t["size_bytes"] for t in tensors),
                             "tensors": tensors}
        total = sum(d["total_bytes"] for d in details.values())
        return {"model": self.model_id, "model_id": self.model_id,
                "architecture": self.arch.label, "dtype": DTYPE_NAMES.get(self.pipe.dtype),
                "num_layers": len(details), "memory_bytes": total,
                "layer_size_bytes": max((d["total_bytes"] for d in details.values()), default=0),
                "master": node(self.pipe.device, ",".join(details), memory_used=total),
                "workers": [], "layer_details": details}
