"""Build a model stage (a layer range) from a checkpoint, on a device and dtype."""
from __future__ import annotations

from typing import Optional

import torch

from cake.text.models import model_class
from cake.text.models.llama import ModelArgs, rope_inv_freq

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def load_stage(checkpoint, start: int = 0, end: Optional[int] = None,
               dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Instantiate layers [start, end) of the checkpoint's model and load only their tensors."""
    args = ModelArgs.from_config(checkpoint.config)
    cls = model_class(checkpoint.config)
    with torch.device("meta"):
        model = cls(args, start, end).to(dtype)
    model = model.to_empty(device=device)
    # to_empty leaves buffers uninitialised; the rope table stays fp32 for precision.
    model.inv_freq = rope_inv_freq(args).to(device)
    model.load_tensors(checkpoint.get)
    return model.eval()
