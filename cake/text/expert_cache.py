"""Offloaded experts repacked once, kept on disk, read back by a copy.

An offloaded expert is loaded each time it is routed to after an eviction. From a GGUF that
means repacking its blocks into the kernels' layout, ~200 MB/s on one core: a few ms per
expert, several experts per token. So the first start with --expert-offload repacks every
expert of the stage once into a file beside the kernels' cache (gate/up already fused), and
loading an expert is then a copy of its bytes from that file's memory map (GB/s), whose pages
are given back right after, so they never count against the budget.

Key: the GGUF's path, size and mtime, the stage's layers, and the kernels' source (where the
packed layout is defined). CAKE_NO_REPACK_CACHE=1 turns it off, as it does the stage cache.
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


def path_for(checkpoint, layers: list[int]) -> Optional[Path]:
    files = checkpoint.files()
    if os.environ.get("CAKE_NO_REPACK_CACHE") or len(files) != 1 or not layers:
        return None
    st = Path(files[0]).stat()
    key = hashlib.sha256(f"{Path(files[0]).resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                         f"{layers}".encode())
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
    """The cache file, mapped (not populated): expert(layer, e, like) copies one out."""

    def __init__(self, path: Path):
        self.index = json.loads(path.with_suffix(".json").read_text())
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        with warnings.catch_warnings():  # read-only memory: only ever copied from
            warnings.simplefilter("ignore", UserWarning)
            self._data = torch.frombuffer(self._map, dtype=torch.uint8)

    @classmethod
    def open(cls, path: Optional[Path]) -> Optional["PackedExperts"]:
        if path is None or not path.exists() or not path.with_suffix(".json").exists():
            return None
        return cls(path)

    def expert(self, layer: int, e: int, template: nn.Module) -> nn.Module:
        entry = self.index[f"{layer}.{e}"]
        expert = type(template).__new__(type(template))
        nn.Module.__init__(expert)
        expert.act = entry["act"]
        for part in PARTS:
            p = entry[part]
            rows, cols = p["shape"]
            start, n = p["offset"], rows * cols
            packed = self._data[start:start + n].view(rows, cols).clone()
            self._give_back(start, n)
            setattr(expert, part, quant.QuantLinear.from_packed(packed, p["qtype"], p["in"],
                                                                p["out"]))
        return expert

    def _give_back(self, start: int, n: int) -> None:
        """The file pages just copied leave this process's resident memory (they stay in the
        page cache for the next read)."""
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, lo, start + n - lo)
