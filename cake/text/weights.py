"""Checkpoint readers: a Hugging Face folder of safetensors, or a GGUF file.

Both expose the same small interface so that a pipeline stage reads only the tensors of its
own layers:  .config (a config.json-shaped dict), .tensor_names(), .get(name) -> Tensor.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open


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
