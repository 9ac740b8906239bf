"""A GGUF stage's repacked weights, cached on disk and memory-mapped back on the next start.

Repacking a 1B model takes seconds, and every fresh 4 KiB page of memory costs a fault (~10 us
on VMs). A second start maps the cached file instead (as llama.cpp maps its GGUF): its pages
are the page cache's, shared, read-only, never copied. The server is ready as soon as the file
is mapped; a thread reads it in meanwhile (populate), so neither the start waits for the disk
nor the first request for a fault per page. The weights lie in
module order, so q/k/v and gate/up stay adjacent and fuse without a copy (quant.fuse_linears).
Key: the GGUF's path, size, mtime and first and last MiB, the stage's layers, and the kernels'
source, where the packed layout is defined. CAKE_NO_REPACK_CACHE=1 turns it off.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from cake.text import kernels

ALIGN = 4096


def path_for(checkpoint, model) -> Optional[Path]:
    """Where a stage's weights repacked from one GGUF-style file are kept (None: not cached)."""
    files, names = checkpoint.files(), checkpoint.tensor_names()
    if os.environ.get("CAKE_NO_REPACK_CACHE") or len(files) != 1 or not names \
            or checkpoint.raw(names[-1]) is None:  # plain tensors: nothing read as blocks
        return None
    source = files[0]
    st = Path(source).stat()
    key = hashlib.sha256(f"{Path(source).resolve()}|{st.st_size}|{st.st_mtime_ns}|{model.start}|"
                         f"{model.end}|{model.is_first}|{model.is_last}".encode())
    key.update(kernels.SOURCE.read_bytes())
    with open(source, "rb") as f:
        key.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        key.update(f.read())
    return kernels.cache_dir().parent / "repacked" / f"{key.hexdigest()[:24]}.bin"


def load(path: Optional[Path]) -> Optional[tuple[torch.Tensor, dict]]:
    """(all the cached bytes as one read-only uint8 tensor, index by module path), or None."""
    if path is None or not path.exists():
        return None
    with open(path, "rb") as f:
        head = int.from_bytes(f.read(8), "little")
        index = json.loads(f.read(head))
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    with warnings.catch_warnings():  # read-only memory: the kernels only read weights
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(mapped, dtype=torch.uint8)
    populate(data)
    return data, index


_MADV_WILLNEED, _MADV_POPULATE_READ = 3, 22  # <sys/mman.h>; POPULATE_READ: Linux 5.14


def populate(mapped: torch.Tensor) -> threading.Thread:
    """Fault a mapped file's pages in, in a thread of its own: libc's madvise through ctypes
    runs without the GIL, so the rest of the start goes on meanwhile. Where the kernel lacks
    MADV_POPULATE_READ, the page cache is at least filled ahead (MADV_WILLNEED)."""
    def run():  # (holds `mapped`: the mapping outlives the call)
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            address, size = mapped.data_ptr(), mapped.numel()
            if libc.madvise(address, size, _MADV_POPULATE_READ) != 0:
                libc.madvise(address, size, _MADV_WILLNEED)
    thread = threading.Thread(target=run, name="cake-populate", daemon=True)
    thread.start()
    return thread


def packed(data: torch.Tensor, entry: dict) -> torch.Tensor:
    rows, cols = entry["shape"]
    return data[entry["offset"]:entry["offset"] + rows * cols].view(rows, cols)


def save(path: Optional[Path], entries: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
    """Write the packed tensors (in the dict's order) with their index; all or nothing."""
    if path is None or not tensors:
        return
    offset, index = 0, {}
    for name, t in tensors.items():
        index[name] = {**entries[name], "offset": offset, "shape": list(t.shape)}
        offset += t.numel()
    # Room for the offsets to grow by `start` (at most 16 more digits each).
    start = -(-(8 + len(json.dumps(index)) + 16 * len(index)) // ALIGN) * ALIGN
    for e in index.values():
        e["offset"] += start
    head = json.dumps(index).encode().ljust(start - 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for t in tensors.values():
                f.write(t.contiguous().numpy().tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
