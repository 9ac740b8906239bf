"""Our own CPU kernels (cpu_kernels.cpp, which includes the MoE and hybrid families' own,
moe_kernels.h), compiled on first use and cached.

The library is built with the system C++ compiler straight against the installed torch
(no ninja, no pybind11), for this machine's instruction set (-march=native, or $CAKE_KERNEL_MARCH), into
~/.cache/cake/kernels/<hash of source, flags, torch and CPU>/; later processes just load it.
`python -m cake.text.kernels` builds it ahead of time (the Makefile's install step does).
When no compiler is there, or on other platforms (or with CAKE_NO_KERNELS set), ops() is None
and callers use plain PyTorch, quantized weights in torch's int4/int8 layouts (quant_torch).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEADERS = [Path(__file__).with_name(name) for name in ("thread_pool.h", "moe_kernels.h")]
_lock = threading.Lock()
_ops = None
_tried = False
_error: Optional[str] = None


def cache_dir() -> Path:
    root = os.environ.get("CAKE_KERNEL_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "cake-kernels" if root else Path.home() / ".cache" / "cake" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile_command(out: Path) -> list[str]:
    # torch's own layout (what torch.utils.cpp_extension reports, without importing it and
    # the setuptools it pulls in)
    root = Path(torch.__file__).parent
    include_paths = [root / "include", root / "include" / "torch" / "csrc" / "api" / "include",
                     Path(sysconfig.get_paths()["include"])]  # Python.h, to release the GIL
    library_paths = [root / "lib"]
    cxx = os.environ.get("CXX", "c++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # CAKE_KERNEL_MARCH=haswell builds the AVX2-only path on a newer CPU (tests do).
    march = os.environ.get("CAKE_KERNEL_MARCH", "native")
    cmd = [cxx, "-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", str(SOURCE), "-o", str(out)]
    cmd += [f"-I{p}" for p in include_paths]
    for p in library_paths:
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    return cmd + ["-lc10", "-ltorch_cpu"]


def library_path() -> Path:
    """Where this source, built for this torch and this CPU, lives in the cache."""
    key = hashlib.sha256()
    for f in [SOURCE, *HEADERS]:
        key.update(f.read_bytes())
    key.update(" ".join(_compile_command(Path("x"))).encode())
    key.update(torch.__version__.encode())
    key.update(_cpu_flags().encode())
    return cache_dir() / key.hexdigest()[:16] / "cake_kernels.so"


def build() -> Path:
    """Compile the library unless the cache has it; safe when several processes race."""
    lib = library_path()
    if lib.exists():
        return lib
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"no kernels for {sys.platform}/{platform.machine()}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place: a racing process sees all or nothing.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    start = time.monotonic()
    log.info("compiling CPU kernels into %s", lib.parent)
    try:
        proc = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled CPU kernels in %.1f s", time.monotonic() - start)
    return lib


def ops():
    """torch.ops.cake with our kernels loaded, or None where they cannot be had (see error())."""
    global _ops, _tried, _error
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("CAKE_NO_KERNELS"):
                _error = "disabled by CAKE_NO_KERNELS"
            else:
                try:
                    torch.ops.load_library(str(build()))
                    _ops = torch.ops.cake
                    _tune_process()
                except Exception as e:  # no compiler, odd platform: PyTorch fallback
                    _error = str(e).strip().splitlines()[0]
            if _ops is None:
                log.warning("CPU kernels unavailable (%s): quantized weights run on torch's "
                            "int4/int8 kernels, slower", _error)
    return _ops


def _tune_process() -> None:
    # CAKE_DENSE_ROWS=64: products of 64 rows or more (prompts) through bfloat16 GEMM, ~3x the
    # int16 kernels' speed per core on a CPU with AMX, but it moves the default model's logits
    # by up to 0.7 (int16: 0.03; its answers stay), so small models keep int16 (see
    # dense_prompts_for).
    torch.ops.cake.set_dense_rows(int(os.environ.get("CAKE_DENSE_ROWS", "0")))
    heap("serve")


# Prompt-sized products (this many rows or more) of a model at least this wide go through the
# bfloat16 GEMM when the CPU has AMX: there a 1B-class model's prompt is compute-bound and the
# int16 products run at ~80 GMAC/s a core against ~220 for AMX bfloat16 with the dequantizing
# (benchmarks/kernel_bench.py --dense-rows 64). The default model (hidden 576) stays int16.
DENSE_PROMPT_ROWS, DENSE_MIN_HIDDEN = 64, 1024


def has_amx() -> bool:
    return "amx_bf16" in _cpu_flags().split()


def dense_prompts_for(hidden_size: int) -> int:
    """Set, for this process, from how many rows our products run as bfloat16 GEMM, for a
    model of this width; CAKE_DENSE_ROWS, when set, decides instead. Returns the rows (0: never)."""
    if ops() is None or "CAKE_DENSE_ROWS" in os.environ:
        return int(os.environ.get("CAKE_DENSE_ROWS", "0") or 0)
    rows = DENSE_PROMPT_ROWS if has_amx() and hidden_size >= DENSE_MIN_HIDDEN else 0
    torch.ops.cake.set_dense_rows(rows)
    return rows


def heap(phase: str) -> None:
    """glibc's malloc tuned for a phase of a CPU server's life. "load": every buffer of 1 MiB
    or more is a mapping of its own, given back when freed, so weights repacked and fused one
    after the other leave no holes (else ~20% more resident memory). "serve": buffers up to
    64 MiB (prompt-sized activations) come from the heap and are reused; as fresh mappings
    every page would fault in again per layer (~10 us a fault on these VMs)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        threshold = (1 << 20) if phase == "load" else (64 << 20)
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD: free heap kept for reuse
        if phase == "serve":
            libc.malloc_trim(0)


def error() -> Optional[str]:
    return _error
