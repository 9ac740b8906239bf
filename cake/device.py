"""Which device and dtype to run on when the user names none (text, image and speech,
master and workers alike)."""
from __future__ import annotations

import torch


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    # GPUs: bf16 where supported (fast, range of fp32). CPU: fp32 is both exact and, for
    # prompt processing, faster than bf16 on CPUs without native bf16 instructions.
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32
