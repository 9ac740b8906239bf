"""The /api/v1/topology document (Cake's format): who holds which layers, with what memory,
and every tensor of every layer. Single-machine serving reports the master alone."""
from __future__ import annotations

import functools
import math
import os
import platform
import socket
import time
from typing import Optional

import torch

from cake.text.weights import TensorIndex, TensorInfo

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


def layer_ranges(spans) -> str:
    """(start, end) pairs -> their layer ranges, adjacent ones joined: a master that took a
    lost worker's layers beside its own shows one range."""
    joined: list[list[int]] = []
    for start, end in sorted((a, b) for a, b in spans if b > a):
        if joined and joined[-1][1] == start:
            joined[-1][1] = end
        else:
            joined.append([start, end])
    return ",".join(layer_range(a, b) for a, b in joined)


def layer_names(ranges: str) -> list[str]:
    """'model.layers.0-2,vae' -> ['model.layers.0', 'model.layers.1', 'model.layers.2', 'vae']."""
    names = []
    for item in filter(None, (r.strip() for r in ranges.split(","))):
        head, _, span = item.rpartition(".")
        first, dash, last = span.partition("-")
        if head and dash and first.isdigit() and last.isdigit():
            names += [f"{head}.{i}" for i in range(int(first), int(last) + 1)]
        else:
            names.append(item)
    return names


@functools.lru_cache(maxsize=None)
def measured_tflops(device: str) -> float:
    """Dense matmul throughput of a device in TFLOPS (best of a few timed products: ~50 ms on
    a CPU, once per process), as the number Cake reports for a node's compute."""
    dev = torch.device(device)
    n, dtype = (4096, torch.bfloat16) if dev.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device=dev)
    best = float("inf")
    for _ in range(4):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        a @ a
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t)
    return round(2 * n ** 3 / best / 1e12, 4)


def cake_shape(doc: dict) -> dict:
    """The document as Cake's clients read it: each node's `layers` a list of layer names
    and `tflops` a number (the master's measured here). `layer_range` keeps the compact
    'model.layers.0-13' form."""
    for i, node in enumerate([doc.get("master") or {}, *doc.get("workers", [])]):
        if not node:
            continue
        layers = node.get("layers") or ""
        if isinstance(layers, str):
            node["layer_range"], node["layers"] = layers, layer_names(layers)
        if node.get("tflops") is None and i == 0 and node.get("device"):
            node["tflops"] = measured_tflops(node["device"])
    return doc


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


class TensorTable:
    """A checkpoint's tensor index, kept so that a server can drop the checkpoint itself: a
    GGUF reader holds ~150 MB of metadata objects, safetensors files stay mapped."""

    def __init__(self, checkpoint: TensorIndex):
        self.config, self._info = checkpoint.config, checkpoint.tensor_info()

    def tensor_info(self) -> dict[str, TensorInfo]:
        return self._info


def tensor_shapes(checkpoint: TensorIndex) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape without reading (or dequantizing) its data."""
    return {n: info.shape for n, info in checkpoint.tensor_info().items()}


def packed_types(checkpoint: TensorIndex, quant: Optional[str]) -> dict[str, tuple[str, int]]:
    """GGUF tensors a stage keeps as blocks under quant "auto": name -> (type, bytes). Types
    the kernels run are kept as in the file, other block types become Q8_0 (34 bytes per 32)."""
    blocks = {n: i for n, i in checkpoint.tensor_info().items() if i.blocks}
    if quant != "auto" or not blocks:
        return {}
    from cake.text.quant import KERNEL_TYPES

    kept = {t.name for t in KERNEL_TYPES}
    out = {}
    for name, info in blocks.items():
        if info.type in kept:
            out[name] = (info.type, info.n_bytes)
        else:
            out[name] = ("Q8_0", math.prod(info.shape) // 32 * 34)
    return out


def shape_layer_details(shapes: dict, dtype, packed: Optional[dict] = None) -> dict:
    """layer_details from tensor shapes alone (layers held on other machines), at the size
    they take once loaded in dtype, or as packed blocks (name -> (type name, bytes))."""
    size = torch.empty((), dtype=dtype).element_size()
    details: dict = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(parts) < 4 or parts[1] != "layers" or not parts[2].isdigit():
            continue
        n = size
        for d in shape:
            n *= d
        type_name = DTYPE_NAMES.get(dtype, str(dtype))
        if packed and name in packed:
            type_name, n = packed[name]
        entry = details.setdefault(".".join(parts[:3]), {"total_bytes": 0, "tensors": []})
        entry["total_bytes"] += n
        entry["tensors"].append({"name": name, "short_name": ".".join(parts[3:]),
                                 "dtype": type_name, "shape": list(shape), "size_bytes": n})
    return dict(sorted(details.items(), key=lambda kv: int(kv[0].split(".")[2])))


def node(device: torch.device, layers: str, status: str = "ready",
         memory_used: Optional[int] = None) -> dict:
    return {"device": str(device), "backend": backend_name(device), "layers": layers,
            "vram_bytes": device_memory(device), "memory_used_bytes": memory_used,
            "tflops": None, "hostname": socket.gethostname(),
            "os": f"{platform.system()} {platform.release()}".strip(), "status": status}


def text_topology(model_id: str, stages: list, workers: list[dict] | None = None,
                  checkpoint=None, quant: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None) -> dict:
    """stages: the Model modules held in this process (the master's). With the checkpoint,
    layer_details covers every layer, wherever it runs, as the checkpoint's tensors.
    dtype: the serving dtype, for when the master's stages hold no parameters."""
    params = [p for s in stages for p in s.parameters()]
    dtype = params[0].dtype if params else dtype
    device = params[0].device if params else stages[0].inv_freq.device
    if checkpoint is not None:
        details = shape_layer_details(tensor_shapes(checkpoint), dtype,
                                      packed_types(checkpoint, quant))
    else:
        details = {}
        for stage in stages:
            details.update(layer_details(stage))
    args = stages[0].args
    total = sum(t.numel() * t.element_size() for s in stages for t in s.state_dict().values())
    per_layer = max((d["total_bytes"] for d in details.values()), default=0)
    local = layer_ranges((s.start, s.end) for s in stages)
    return {
        "model": model_id, "model_id": model_id,
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "num_layers": args.num_hidden_layers, "memory_bytes": total,
        "layer_size_bytes": per_layer,
        "master": node(device, local, memory_used=total),
        "workers": workers or [],
        "layer_details": dict(sorted(details.items(), key=lambda kv: int(kv[0].split(".")[2]))),
    }
