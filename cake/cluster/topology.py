"""The /api/v1/topology document (Cake's format): who holds which layers, with what memory,
and every tensor of every layer. Single-machine serving reports the master alone."""
from __future__ import annotations

import os
import platform
import socket
from typing import Optional

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int8: "I8", torch.uint8: "U8"}


def device_memory(device: torch.device) -> int:
    """Total memory of the device the layers live on (GPU memory, else RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def backend_name(device: torch.device) -> str:
    return {"cuda": "cuda", "mps": "metal"}.get(device.type, "cpu")


def layer_range(start: int, end: int) -> str:
    return f"model.layers.{start}-{end - 1}" if end > start else ""


def layer_details(stage) -> dict:
    details: dict = {}
    # The checkpoint's tensors, however loading holds them (quantized, fused).
    for name, (shape, dtype, size) in stage.tensor_details().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] != "layers":
            continue
        key = ".".join(parts[:3])
        entry = details.setdefault(key, {"total_bytes": 0, "tensors": []})
        entry["total_bytes"] += size
        entry["tensors"].append({"name": name, "short_name": ".".join(parts[3:]),
                                 "dtype": dtype, "shape": shape, "size_bytes": size})
    return details


def shape_layer_details(shapes: dict, dtype) -> dict:
    """layer_details from tensor shapes alone (layers held on other machines), at the size
    they take once loaded in dtype."""
    size = torch.empty((), dtype=dtype).element_size()
    details: dict = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(parts) < 4 or parts[1] != "layers" or not parts[2].isdigit():
            continue
        n = size
        for d in shape:
            n *= d
        entry = details.setdefault(".".join(parts[:3]), {"total_bytes": 0, "tensors": []})
        entry["total_bytes"] += n
        entry["tensors"].append({"name": name, "short_name": ".".join(parts[3:]),
                                 "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
                                 "shape": list(shape), "size_bytes": n})
    return dict(sorted(details.items(), key=lambda kv: int(kv[0].split(".")[2])))


def node(device: torch.device, layers: str, status: str = "ready",
         memory_used: Optional[int] = None) -> dict:
    return {"device": str(device), "backend": backend_name(device), "layers": layers,
            "vram_bytes": device_memory(device), "memory_used_bytes": memory_used,
            "tflops": None, "hostname": socket.gethostname(),
            "os": f"{platform.system()} {platform.release()}".strip(), "status": status}


def text_topology(model_id: str, stages: list, workers: list[dict] | None = None) -> dict:
    """stages: the Model modules held in this process (the master's)."""
    details: dict = {}
    for stage in stages:
        details.update(layer_details(stage))
    args = stages[0].args
    total = sum(t.numel() * t.element_size() for s in stages for t in s.state_dict().values())
    per_layer = max((d["total_bytes"] for d in details.values()), default=0)
    param = next(stages[0].parameters())
    local = [layer_range(s.start, s.end) for s in stages if s.end > s.start]
    return {
        "model": model_id, "model_id": model_id,
        "dtype": DTYPE_NAMES.get(param.dtype, str(param.dtype)),
        "num_layers": args.num_hidden_layers, "memory_bytes": total,
        "layer_size_bytes": per_layer,
        "master": node(param.device, ",".join(local), memory_used=total),
        "workers": workers or [],
        "layer_details": dict(sorted(details.items(), key=lambda kv: int(kv[0].split(".")[2]))),
    }
