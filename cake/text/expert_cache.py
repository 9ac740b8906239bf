"""Offloaded experts repacked once, kept on disk, multiplied straight from its memory map.

An offloaded expert is loaded each time it is routed to after an eviction. From a GGUF that
means repacking its blocks into the kernels' layout, ~200 MB/s on one core: a few ms per
expert, several experts per token. So the first start with --expert-offload repacks every
expert of the stage once into a file beside the kernels' cache (gate/up already fused, each
expert starting on a page of its own), and loading an expert is then a view of its bytes in
that file's memory map: no copy (a copy cost more than the product itself, ~0.3 ms an expert
here), the kernels read the page cache directly and its pages join this process's resident
memory as they are touched. Each expert is a mapping of its own, unmapped when it is evicted:
its pages leave this process but stay in the page cache for the next read, outside the budget.

Key: the GGUF's path, size and mtime, the stage's layers, the file's layout (FORMAT) and the
kernels' source (where the packed layout is defined). CAKE_NO_REPACK_CACHE=1 turns it off, as
it does the stage cache.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from cake.text import kernels, quant

PARTS = ("gate_up_proj", "down_proj")
FORMAT = 2  # 2: each expert page-aligned, so giving one back leaves its neighbours mapped
PAGE = mmap.PAGESIZE


def path_for(checkpoint, layers: list[int]) -> Optional[Path]:
    files = checkpoint.files()
    if os.environ.get("CAKE_NO_REPACK_CACHE") or len(files) != 1 or not layers:
        return None
    st = Path(files[0]).stat()
    key = hashlib.sha256(f"{Path(files[0]).resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                         f"{layers}|{FORMAT}|{PAGE}".encode())
    key.update(kernels.SOURCE.read_bytes())
    for header in kernels.HEADERS:
        key.update(header.read_bytes())
    return kernels.cache_dir().parent / "experts" / f"{key.hexdigest()[:24]}.bin"


def cacheable(expert: nn.Module) -> bool:
    return all(isinstance(getattr(expert, p, None), quant.QuantLinear) for p in PARTS)


def build(path: Path, layers: dict[int, tuple[int, Callable[[int], nn.Module]]]) -> bool:
    """Write every expert of layers (layer -> (count, load(e))) repacked; False (and no file)
    when some expert is not two quantized matrices (gate/up fused, down)."""
    index: dict[str, dict] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            offset = 0
            for layer, (count, load) in layers.items():
                for e in range(count):
                    expert = load(e)
                    if not cacheable(expert):
                        return False
                    entry = {}
                    f.write(bytes(-offset % PAGE))
                    offset += -offset % PAGE
                    for part in PARTS:
                        m = getattr(expert, part)
                        data = m.packed.contiguous()
                        f.write(data.numpy().tobytes())
                        entry[part] = {"offset": offset, "shape": list(data.shape),
                                       "qtype": m.qtype, "in": m.in_features,
                                       "out": m.out_features}
                        offset += data.numel()
                    index[f"{layer}.{e}"] = {**entry, "act": expert.act}
        Path(tmp + ".json").write_text(json.dumps(index))
        os.replace(tmp, path)  # the data first: an index never names a missing file
        os.replace(tmp + ".json", path.with_suffix(".json"))
        return True
    finally:
        for t in (tmp, tmp + ".json"):
            if os.path.exists(t):
                os.unlink(t)


class PackedExperts:
    """The cache file: expert(layer, e, like) is one expert over its bytes there, in a
    mapping of its own (unpopulated; its pages fault in as the kernels read them), unmapped
    when the expert is dropped. One mapping per expert, not one of the whole file: the kernel
    maps pages around each one that faults (fault-around, 64 KiB), which in one mapping would
    leave pages of experts not resident counted against the budget."""

    def __init__(self, path: Path):
        self.index = json.loads(path.with_suffix(".json").read_text())
        self._file = open(path, "rb")

    @classmethod
    def open(cls, path: Optional[Path]) -> Optional["PackedExperts"]:
        if path is None or not path.exists() or not path.with_suffix(".json").exists():
            return None
        return cls(path)

    def expert(self, layer: int, e: int, template: nn.Module) -> nn.Module:
        entry = self.index[f"{layer}.{e}"]
        first, last = entry[PARTS[0]], entry[PARTS[-1]]
        start = first["offset"]  # a page's (FORMAT 2)
        end = last["offset"] + last["shape"][0] * last["shape"][1]
        pages = mmap.mmap(self._file.fileno(), end - start, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ, offset=start)
        with warnings.catch_warnings():  # read-only memory: the kernels only read weights
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(pages, dtype=torch.uint8)
        expert = type(template).__new__(type(template))
        nn.Module.__init__(expert)
        expert.act = entry["act"]
        for part in PARTS:
            p = entry[part]
            rows, cols = p["shape"]
            at = p["offset"] - start
            setattr(expert, part, quant.QuantLinear.from_packed(
                data[at:at + rows * cols].view(rows, cols), p["qtype"], p["in"], p["out"],
                check=False))
        return expert
