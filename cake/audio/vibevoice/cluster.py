"""VibeVoice's language model spread over cluster workers.

Its decoder layers are a Qwen2 model's, so the text cluster places, ships and runs them
(cake/cluster/pipeline.py, headless: layers only). The master keeps everything else: the
embeddings, the final norm and the speech-token head, the acoustic and semantic towers and
the diffusion head; each step it sends the input embeddings around the ring and gets the
last layer's hidden states back.
"""
from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "model.language_model."


class LanguageModelCheckpoint:
    """The language-model tensors of a VibeVoice folder under a text model's names
    (model.language_model.layers.N.* -> model.layers.N.*), read from the files on demand:
    what cluster stages load, and ship to workers. Both checkpoint layouts (Microsoft's and
    transformers') name these tensors alike."""

    def __init__(self, folder: Path, text_config: dict):
        from safetensors import safe_open

        self.config = text_config
        self._file_of: dict[str, Path] = {}
        self._stored: dict[str, str] = {}  # our name -> the name in the file
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for stored in st.keys():
                    if stored.startswith(PREFIX):
                        name = "model." + stored[len(PREFIX):]
                    elif stored == "lm_head.weight":
                        name = stored
                    else:
                        continue
                    self._file_of[name], self._stored[name] = f, stored
        if not any(".layers." in n for n in self._file_of):
            raise FileNotFoundError(f"no language-model layers ({PREFIX}layers.*) in {folder}")
        self._open: dict[Path, object] = {}

    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def tensor_info(self) -> dict:
        from cake.text.weights import safetensors_info

        return safetensors_info(self._file_of, self._stored)

    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def raw(self, name: str) -> None:
        return None

    def read_sparsely(self) -> None:
        pass  # safetensors reads each tensor's own bytes

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self._file_of[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        return self._open[f].get_tensor(self._stored[name])


def start_language_model_ring(folder: Path, text_config: dict, dtype: torch.dtype, device: str,
                              max_len: int, cluster):
    """The ring of stages for the language model; two KV slots (the prompted and the
    unconditional branch of guidance). Layers stay in `dtype`, unquantized, as on one node."""
    from cake.cluster.pipeline import start_cluster_pipeline

    return start_cluster_pipeline(LanguageModelCheckpoint(folder, text_config), dtype, device,
                                  num_slots=2, max_len=max_len, opts=cluster, quant=None,
                                  headless=True)
