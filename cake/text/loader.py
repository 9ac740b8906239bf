"""Build a model stage (a layer range) from a checkpoint, on a device and dtype, optionally
with quantized weights."""
from __future__ import annotations

import mmap
from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from cake import loading
from cake.text import kernels, quant, repack_cache
from cake.text.models import model_class
from cake.text.models.args import ModelArgs
from cake.text.quant_torch import TorchQuantLinear

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
QUANT_MODES = ("auto", "none", *quant.QTYPES)
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


def resolve_quant(mode: Optional[str], device: str) -> Optional[str]:
    """The weight format a stage is loaded with. "auto": a GGUF keeps its blocks on a CPU (in
    our kernels' layout, or torch's int4/int8 ones where the kernels are missing: quant_torch);
    anything else (safetensors, GPUs) runs in full precision."""
    if mode in (None, "none"):
        return None
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose from {', '.join(QUANT_MODES)}")
    if torch.device(device).type != "cpu":
        if mode == "auto":
            return None
        raise ValueError(f"--quant {mode} runs on CPU only, not on {device}")
    return mode


def load_stage(checkpoint, start: int = 0, end: Optional[int] = None,
               dtype: torch.dtype = torch.float32, device: str = "cpu",
               quant_mode: Optional[str] = None, headless: bool = False,
               expert_budget: Optional[int] = None):
    """Instantiate layers [start, end) of the checkpoint's model and load only their tensors.

    quant_mode (see resolve_quant): None keeps every weight in `dtype`; "auto" keeps a GGUF's
    blocks of the kernels' types (quant.KERNEL_TYPES) as they are, stores its other quantized matrices as Q8_0 and its
    float ones in `dtype`; "q4_0"/"q4_1"/"q8_0" stores every matrix in that type.
    headless: the layers alone, without the embeddings, final norm and head that a range
    starting at 0 or ending at the last layer would hold (a worker's range: those live on
    the master).
    expert_budget: keep MoE experts in the checkpoint, at most this many bytes of them
    resident (cake/text/expert_offload.py)."""
    mode = resolve_quant(quant_mode, device)
    args = ModelArgs.from_config(checkpoint.config)
    cls = model_class(checkpoint.config)
    with torch.device("meta"):
        model = cls(args, start, end).to(dtype)
    if headless:
        model.is_first = model.is_last = False
        model.model.embed_tokens = model.model.norm = model.lm_head = None
    materialize(model, device)
    model.reset_rope(device)  # materialize left the buffers uninitialised
    model.expert_lru = None
    if expert_budget is not None:
        from cake.text.expert_offload import offload_experts
        model.expert_lru = offload_experts(
            model, checkpoint, lambda source, name, like: _load_matrix(source, name, like, mode,
                                                                       dtype, device),
            expert_budget)
    info = checkpoint.tensor_info()
    needed = {model.checkpoint_name(n) for n, _ in model.named_parameters()}
    loading.expect({n: info[n].n_bytes for n in needed if n in info})  # for /health
    try:
        if mode:
            kernels.heap("load")
            _quantize_matrices(model, checkpoint, mode, cache=expert_budget is None)
        model.load_tensors(loading.reading(checkpoint.get))
    finally:
        loading.finished()
    model.fuse_projections()
    if mode:
        kernels.heap("serve")
        kernels.dense_prompts_for(args.hidden_size)
    return model.eval()


def materialize(model: nn.Module, device) -> None:
    """Module.to_empty, minus its Python reference path for meta tensors, which imports
    sympy and torch.fx (~70 MiB resident for the life of the server)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            module._parameters[name] = nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False)
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def _load_matrix(checkpoint, name: str, like: nn.Linear, mode: Optional[str], dtype, device):
    """One matrix as a module on its own (an offloaded expert's): quantized as the stage's
    other matrices are, else dense in dtype."""
    found = _blocks(checkpoint, name, mode) if mode else None
    if found is not None:
        blocks, qtype = found
        layer = quant.QuantLinear(blocks, qtype, like.in_features)
        _drop_pages(blocks)
        return layer
    layer = nn.Linear(like.in_features, like.out_features, bias=False, device="meta")
    layer.weight = nn.Parameter(checkpoint.get(name).to(dtype=dtype, device=device),
                                requires_grad=False)
    return layer


def _quantize_matrices(model, checkpoint, mode: str, cache: bool = True) -> None:
    """Replace Linear/Embedding modules by quantized ones read from the checkpoint, or from
    the cache of their repacked weights (repack_cache) that a first start writes (not with
    offloaded experts: the cache holds a stage's every matrix)."""
    fast = quant.available()  # else torch's int4/int8 layouts (quant_torch), not cached
    cache = repack_cache.path_for(checkpoint, model) \
        if mode == "auto" and fast and cache else None
    cached = repack_cache.load(cache)
    if cached is not None:
        checkpoint.read_sparsely()
    entries, tensors = {}, {}
    for path, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        bias = None
        if isinstance(module, nn.Linear) and module.bias is not None:
            bias = checkpoint.get(model.checkpoint_name(f"{path}.bias"))
        if cached is not None:
            if path not in cached[1]:
                continue
            e = cached[1][path]
            table = quant.QuantLinear.from_packed(repack_cache.packed(cached[0], e), e["qtype"],
                                                  e["in"], e["out"], bias)
        else:
            found = _blocks(checkpoint, model.checkpoint_name(f"{path}.weight"), mode)
            if found is None:
                continue
            blocks, qtype = found
            if fast:
                table = quant.QuantLinear(blocks, qtype, module.weight.shape[1], bias)
                held = int(blocks.nbytes)
            else:
                table = TorchQuantLinear(blocks, qtype, module.weight.shape[1], bias,
                                         rows=isinstance(module, nn.Embedding))
                held = table.nbytes()
            e = {"qtype": int(qtype), "in": table.in_features, "out": table.out_features,
                 "bytes": held}
            if fast:
                entries[path], tensors[path] = e, table.packed
            _drop_pages(blocks)
        new = table
        if isinstance(module, nn.Embedding):
            new = quant.QuantEmbedding.from_table(table, module.weight.dtype)
        model.set_submodule(path, new)
        loading.loaded(model.checkpoint_name(f"{path}.weight"))
        model.quantized[f"{path}.weight"] = (GGMLQuantizationType(e["qtype"]).name, e["bytes"])
    if cached is None:
        repack_cache.save(cache, entries, tensors)


def _blocks(checkpoint, name: str, mode: str):
    """(GGUF blocks [rows, bytes], type) for a matrix in the chosen mode, None to keep it dense."""
    target = None if mode == "auto" else quant.QTYPES[mode]
    packed = checkpoint.raw(name)
    if packed is not None:
        qtype, data, shape = packed
        if target is None and qtype in _FLOAT_TYPES:
            return None
        if qtype == target or (target is None and qtype in quant.KERNEL_TYPES):
            return data, qtype  # the file's pages, repacked straight from the memory map
        target = target or GGMLQuantizationType.Q8_0  # K-quants and the like: requantize
    elif target is None:
        return None
    weight = checkpoint.get(name)
    if weight.ndim != 2 or weight.shape[1] % 32:
        return None  # blocks of 32 along the input
    return quant.quantize_blocks(weight, target), target


def _drop_pages(array: np.ndarray) -> None:
    """Give back the memory-mapped file pages a tensor was repacked from (no-op for memory of
    our own). They stay in the page cache, but no longer count in this process's resident
    memory, so loading holds each weight once rather than twice."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise"):
        return
    start = array.__array_interface__["data"][0]
    origin = np.frombuffer(base, dtype=np.uint8).__array_interface__["data"][0]
    lo = (start - origin) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = start - origin + array.nbytes
    base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
