"""Checkpoint readers: a Hugging Face folder of safetensors, or a GGUF file (gguf_weights),
and the Checkpoint protocol every format implements, so that a stage reads only the tensors
of its own layers and placement sizes layers without reading any."""
from __future__ import annotations

import json
import re
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

    def read_sparsely(self) -> None:
        """A hint: from now on only small tensors are read (the matrices come from
        repack_cache), so reading ahead around them is wasted."""


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
        self._stored: dict[str, str] = {}  # our name -> the file's, where they differ
        if self.config.get("model_type") in LANGUAGE_MODELS:
            self.config, self._stored = language_model(self.config, self._file_of)
            self._file_of = {ours: self._file_of[theirs] for ours, theirs in self._stored.items()}

    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def tensor_info(self) -> dict[str, TensorInfo]:
        return safetensors_info(self._file_of, self._stored)

    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def raw(self, name: str) -> None:
        return None

    def read_sparsely(self) -> None:
        pass  # safetensors reads each tensor's own bytes

    def _file(self, name: str):
        f = self._file_of[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        return self._open[f]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            fused = fused_expert(name, self._file_of)
            if fused is None:
                raise KeyError(f"tensor {name} not in checkpoint {self.folder}")
            whole, index, half = fused
            part = self._file(whole).get_slice(self._stored.get(whole, whole))[index]  # that one
            return part if half is None else part.chunk(2)[half].contiguous()
        return self._file(name).get_tensor(self._stored.get(name, name))


# Multimodal checkpoints whose language model is served alone -> where its weights lie.
LANGUAGE_MODELS = {"qwen3_5": "model.language_model.", "qwen3_5_moe": "model.language_model."}


def language_model(config: dict, names) -> tuple[dict, dict[str, str]]:
    """The text model of a multimodal checkpoint: its text_config (with the top level's
    token ids and tying), and its tensors under our names (model.layers..., lm_head) ->
    theirs; the vision tower's and other heads' tensors are left out."""
    prefix = LANGUAGE_MODELS[config["model_type"]]
    text = dict(config["text_config"])
    for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id"):
        if config.get(key) is not None:
            text[key] = config[key]
    stored = {"model." + n[len(prefix):]: n for n in names if n.startswith(prefix)}
    stored.update({n: n for n in names if n.startswith("lm_head.")})
    return text, stored


_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def fused_expert(name: str, names) -> "tuple[str, int, int | None] | None":
    """Where a per-expert matrix (mlp.experts.E.gate_proj.weight) lies in a checkpoint that
    stores a layer's experts fused, as transformers 5 holds them: (fused tensor, expert,
    which half of its rows or None). gate_up_proj [E, 2F, D] holds gate then up;
    down_proj [E, D, F]."""
    m = _EXPERT.fullmatch(name)
    if m is None:
        return None
    base, e, kind = m[1], int(m[2]), m[3]
    if kind == "down":
        return (f"{base}.down_proj", e, None) if f"{base}.down_proj" in names else None
    fused = f"{base}.gate_up_proj"
    if fused not in names:
        return None
    return fused, e, 0 if kind == "gate" else 1


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
