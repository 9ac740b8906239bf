"""Checkpoint readers: a Hugging Face folder of safetensors, or a GGUF file (gguf_weights),
and the Checkpoint protocol every format implements, so that a stage reads only the tensors
of its own layers and placement sizes layers without reading any."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch
from safetensors import safe_open

# Bytes per element of safetensors' dtypes.
SAFETENSORS_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2,
                     "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8,
                     "I64": 8, "U64": 8}


FLOAT_TYPES = ("F32", "F16", "BF16")  # GGUF types that are no GGML blocks


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]  # in Hugging Face order
    type: str  # as stored: "F32", "BF16", "Q4_K", ...
    n_bytes: int  # as stored
    blocks: bool = False  # GGML quant blocks (kept packed where the kernels take them)


@runtime_checkable
class TensorIndex(Protocol):
    """What sizing and the topology document read: names and sizes, no data."""

    config: dict

    def tensor_info(self) -> dict[str, TensorInfo]: ...


@runtime_checkable
class Checkpoint(TensorIndex, Protocol):
    def tensor_names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor, dense (GGML blocks dequantized), in Hugging Face layout."""

    def raw(self, name: str) -> Optional[tuple]:
        """(ggml type, packed rows, Hugging Face shape) of a tensor stored in GGML blocks or
        floats of a GGUF; None where the format holds plain tensors."""

    def files(self) -> list[Path]:
        """The files holding the weights (what identifies them)."""


def layer_tensor_names(checkpoint: Checkpoint, start: int, end: int) -> list[str]:
    """The tensors of decoder layers [start, end)."""
    prefixes = tuple(f"model.layers.{i}." for i in range(start, end))
    return [n for n in checkpoint.tensor_names() if n.startswith(prefixes)]


def safetensors_info(files: dict, stored: Optional[dict] = None) -> dict[str, TensorInfo]:
    """name -> TensorInfo from the headers of the files (name -> file); stored: name -> the
    name in the file, where they differ."""
    info = {}
    for f in sorted(set(files.values())):
        with safe_open(f, "pt") as st:
            for name in [n for n, g in files.items() if g == f]:
                part = st.get_slice((stored or {}).get(name, name))
                shape, dtype = tuple(part.get_shape()), part.get_dtype()
                n = SAFETENSORS_SIZES.get(dtype, 4)
                for d in shape:
                    n *= d
                info[name] = TensorInfo(shape, dtype, n)
    return info


class SafetensorsCheckpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.folder / f for name, f in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {self.folder}")
            self._file_of = {}
            for f in files:
                with safe_open(f, "pt") as st:
                    self._file_of.update({name: f for name in st.keys()})
        self._open: dict[Path, object] = {}

    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def tensor_info(self) -> dict[str, TensorInfo]:
        return safetensors_info(self._file_of)

    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def raw(self, name: str) -> None:
        return None

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"tensor {name} not in checkpoint {self.folder}")
        f = self._file_of[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        return self._open[f].get_tensor(name)


def open_checkpoint(path: str | Path):
    """A checkpoint reader for a model folder or a .gguf file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from cake.text.gguf_weights import GGUFCheckpoint
        return GGUFCheckpoint(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            from cake.text.gguf_weights import GGUFCheckpoint
            return GGUFCheckpoint(ggufs[0])
        return SafetensorsCheckpoint(path)
    raise FileNotFoundError(f"no model at {path}")
