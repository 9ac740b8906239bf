"""MoE experts that need not fit in memory (--expert-offload).

The experts stay in the checkpoint, memory-mapped (a GGUF's packed blocks, or safetensors),
and an expert is read only when a token is routed to it. Experts read recently stay
resident, in a least-recently-used set under a byte budget shared by all layers; evicting
one frees its memory, and the file pages it was read from are given back after reading.
A GGUF's experts are repacked once into a file of their own, and the kernels then multiply
them where they lie in that file, each expert a mapping of its own (no copy), unmapped when
it is evicted (expert_cache.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size()
               for t in [*module.parameters(), *module.buffers()])


class ExpertLRU:
    """Resident experts of every layer, (layer, expert) -> module, under budget bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        # key -> (module, bytes, whether its memory came from the heap, not a file's map)
        self._held: OrderedDict[tuple[int, int], tuple[nn.Module, int, bool]] = OrderedDict()
        self.resident_bytes = 0
        self.mapped_bytes = 0  # the checkpoint bytes of every offloaded expert
        self.loads = 0
        self.packed_file: Optional[str] = None  # experts used where they lie (expert_cache)

    def get(self, key: tuple[int, int], load: Callable[[], nn.Module],
            heap: bool = True) -> nn.Module:
        """heap: the module's memory is allocated (else a file's map, unmapped when the
        module goes)."""
        held = self._held.get(key)
        if held is not None:
            self._held.move_to_end(key)
            return held[0]
        module = load()
        size = module_bytes(module)
        heap_freed = False
        while self._held and self.resident_bytes + size > self.budget:
            _, (_, freed, from_heap) = self._held.popitem(last=False)
            self.resident_bytes -= freed
            heap_freed |= from_heap
        if heap_freed:
            give_back_heap()
        self._held[key] = (module, size, heap)
        self.resident_bytes += size
        self.loads += 1
        return module

    def stats(self) -> dict:
        return {"experts_resident_bytes": self.resident_bytes,
                "experts_mapped_bytes": self.mapped_bytes,
                "experts_budget_bytes": self.budget, "expert_loads": self.loads}


def give_back_heap() -> None:
    """Return freed heap memory to the OS: a serving process keeps up to 64 MiB of it for
    reuse (kernels.heap), which evicted experts would otherwise leave resident."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class OffloadedExperts:
    """Stands in for a layer's nn.ModuleList of experts: experts[e] loads expert e on use."""

    def __init__(self, layer: int, count: int, load: Callable[[int], nn.Module],
                 lru: ExpertLRU, mapped_bytes: int):
        self.layer, self.count, self._load, self.lru = layer, count, load, lru
        self.heap = True  # loads allocate (else they map expert_cache's file)
        lru.mapped_bytes += mapped_bytes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, e: int) -> nn.Module:
        return self.lru.get((self.layer, e), lambda: self._load(e), self.heap)


class MappedMatrices:
    """A GGUF's expert matrices as views of its memory map, read as a checkpoint is (.raw,
    .get): all the serving process keeps of the file (its reader's metadata objects take
    ~100 MB with a real vocabulary)."""

    def __init__(self, checkpoint, names: list[str]):
        self._raw = {n: checkpoint.raw(n) for n in names}

    def raw(self, name: str):
        return self._raw[name]

    def get(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        qtype, data, shape = self._raw[name]
        return torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32)).view(shape)


@torch.no_grad()
def offload_experts(model: nn.Module, checkpoint, load_matrix: Callable, budget: int) -> ExpertLRU:
    """Replace every SparseMoE's experts of a stage by OffloadedExperts reading from the
    checkpoint. load_matrix(source, name, like) -> the module (quantized or dense Linear) for
    the matrix `name` of source (a checkpoint), shaped like the nn.Linear `like`."""
    from cake.text.models.moe import SparseMoE

    from cake.text import expert_cache

    lru = ExpertLRU(budget)
    names = [n for n in model.tensor_names() if ".mlp.experts." in n]
    source, packed_path = checkpoint, None
    if names and checkpoint.raw(names[0]) is not None:  # GGUF blocks: keep only their map
        checkpoint = MappedMatrices(checkpoint, names)
        layers = sorted({int(n.split(".")[2]) for n in names})
        packed_path = expert_cache.path_for(source, layers)
    packed = expert_cache.PackedExperts.open(packed_path)
    offloaded: dict[int, tuple[OffloadedExperts, nn.Module]] = {}  # layer -> (them, a template)
    for path, moe in list(model.named_modules()):
        if not isinstance(moe, SparseMoE) or isinstance(moe.experts, OffloadedExperts):
            continue
        layer = int(path.split(".")[2])  # model.layers.N.mlp
        template = moe.experts[0]

        def load(e, path=path, template=template):
            expert = type(template).__new__(type(template))
            nn.Module.__init__(expert)
            expert.act = template.act
            expert.gate_up_proj = None
            for part in ("gate_proj", "up_proj", "down_proj"):
                setattr(expert, part, load_matrix(checkpoint, f"{path}.experts.{e}.{part}.weight",
                                                  getattr(template, part)))
            expert.fuse()
            return expert

        mapped = sum(matrix_bytes(checkpoint, f"{path}.experts.{e}.{p}.weight",
                                  getattr(template, p))
                     for e in range(len(moe.experts)) for p in ("gate_proj", "up_proj",
                                                                 "down_proj"))
        count = len(moe.experts)
        del moe.experts  # a submodule until now
        moe.experts = OffloadedExperts(layer, count, load, lru, mapped)
        offloaded[layer] = (moe.experts, template)
    if packed is None and packed_path is not None and offloaded and expert_cache.build(
            packed_path, {i: (x.count, x._load) for i, (x, _) in offloaded.items()}):
        packed = expert_cache.PackedExperts.open(packed_path)
    if packed is not None:  # the experts repacked already, used where they lie in its map
        lru.packed_file = str(packed_path)
        for layer, (experts, template) in offloaded.items():
            experts._load = (lambda e, layer=layer, template=template:
                             packed.expert(layer, e, template))
            experts.heap = False
    return lru


def matrix_bytes(checkpoint, name: str, like: nn.Module) -> int:
    """A matrix's bytes in the file (a GGUF's blocks), else as the stage holds it."""
    raw = checkpoint.raw(name)
    if raw is not None:
        return int(raw[1].nbytes)
    return like.weight.numel() * like.weight.element_size()


def budget_for(checkpoint, offload: bool, memory: Optional[int]) -> Optional[int]:
    """The resident experts' budget in bytes, or None to load every expert: offloading when
    asked, or when the experts would take more than 3/4 of the memory free now; the budget
    is `memory`, else half of what is free."""
    total = experts_bytes(checkpoint)
    if not total:
        return None
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if not offload and total <= 0.75 * free:
        return None
    return memory if memory is not None else free // 2


def experts_bytes(checkpoint) -> int:
    """What all the checkpoint's experts take as stored (0 for a dense model)."""
    return sum(info.n_bytes for name, info in checkpoint.tensor_info().items()
               if ".mlp.experts." in name)
