"""An image pipeline's big components (text encoders, transformer/UNet, VAE) on cluster workers.

Cake's topology.yml names them per node (`layers: [unet]`, or clip, clip2, t5, vae, and
diffusers' own names). A placed component is not loaded on the master: the pipeline holds a
stand-in instead, the real class built on the meta device (so its config, submodules and the
attributes a pipeline reads are all there, without weights), whose forward/encode/decode are
one Ray call to the worker's actor. Tensors travel through Ray on the CPU; the actor runs
them on its best device and dtype.

A worker holds the component from its own Hugging Face cache when it has the same snapshot,
else from files the master ships once and it keeps, checksummed, in
$CAKE_CACHE/components/<fingerprint>/<component>/. A worker that dies mid-render hands its
components back: the master loads them from its own files and renders the image again from
its first step, so the client still gets it.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from cake.cluster import keys
from cake.cluster.worker import NodeWorker, actor_setup, hf_snapshot, worker_cache
from cake.image.generator import ImageModel

log = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "unet", "vae")
# Cake's names -> (diffusers component, what its class name must start with)
ALIASES = {"clip": ("text_encoder", "CLIP"), "clip2": ("text_encoder_2", "CLIP"),
           "t5": ("text_encoder_2", "T5")}
CHUNK = 64 << 20  # bytes per shipment call: bounds memory on both ends
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


class ComponentLost(RuntimeError):
    """The worker holding a component died or stopped answering."""

    def __init__(self, worker: str, error: str):
        super().__init__(f"worker {worker} lost: {error}")
        self.worker, self.error = worker, error


# --- which node holds which component ----------------------------------------------------

def read_placement(topology_path: str, index: dict) -> tuple[dict[str, list[str]], dict]:
    """Cake's topology.yml -> ({node: [component, ...]}, {node: description}) for the
    pipeline whose model_index.json is `index`. Nodes naming nothing are left out."""
    import yaml

    try:
        with open(topology_path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the topology {topology_path}: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{topology_path}: expected a mapping of node name -> settings")
    present = {n for n in COMPONENTS if (index.get(n) or [None])[0]}
    placement, descriptions, holder = {}, {}, {}
    for node, spec in doc.items():
        node, spec = str(node), spec or {}
        items = spec.get("layers") or []
        items = [items] if isinstance(items, str) else items
        names = []
        for item in items:
            name = component_name(str(item).strip(), index, present)
            if name in holder:
                raise ValueError(f"{topology_path}: {name} is placed on both {holder[name]} "
                                 f"and {node}")
            holder[name] = node
            names.append(name)
        if names:
            placement[node] = names
            descriptions[node] = str(spec.get("description", ""))
    return placement, descriptions


def component_name(item: str, index: dict, present: set[str]) -> str:
    """A topology entry -> the pipeline's component name, or a clear ValueError."""
    cls = index.get("_class_name", "this pipeline")
    if item in ALIASES:
        name, prefix = ALIASES[item]
        if name in present and index[name][1].startswith(prefix):
            return name
        raise ValueError(f"topology names {item!r}, but {cls} has no {prefix} encoder "
                         f"(its components: {', '.join(sorted(present))})")
    if item in COMPONENTS:
        if item in present:
            return item
        raise ValueError(f"topology names {item!r}, but {cls} has no {item} (its components: "
                         f"{', '.join(sorted(present))})")
    raise ValueError(f"topology names {item!r}: an image model's nodes hold components, one of "
                     f"{', '.join(sorted(present))} (or Cake's names "
                     f"{', '.join(a for a, (n, p) in ALIASES.items() if n in present)})")


# --- a component's files and classes -----------------------------------------------------

def component_class(index: dict, name: str):
    library, class_name = index[name][:2]
    return getattr(importlib.import_module(library), class_name)


def component_files(folder: Path, variant: Optional[str]) -> list[Path]:
    """What loading the component reads: configs and the weights of the chosen variant."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    weights = [p for p in files if p.name.endswith(".safetensors")]
    if not weights:
        return files
    wanted = [w for w in weights if (f".{variant}." in w.name) == bool(variant)]
    return [p for p in files if not p.name.endswith(WEIGHT_SUFFIXES)] + (wanted or weights)


def fingerprint(folder: Path, files: list[Path]) -> str:
    """Identifies a component's weights cheaply: every file's name and size, and the first
    and last MiB of each (as ray_cluster.model_fingerprint does for text models)."""
    from cake.cluster.ray_cluster import hash_file_ends

    h = hashlib.sha256()
    for f in files:
        hash_file_ends(h, f, str(f.relative_to(folder)))
    return h.hexdigest()[:32]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def load_component(cls, folder: Path, dtype: torch.dtype, device, variant: Optional[str]):
    """The real module from its folder (a pipeline's subfolder), as the pipeline loads it."""
    kwargs = {"variant": variant} if variant else {}
    # Weights loaded under inference mode compute differently (measured: UNet outputs 1e-6
    # apart): load as the pipeline does, whatever mode the caller is in.
    with torch.inference_mode(False):
        return cls.from_pretrained(folder, dtype=dtype, **kwargs).to(device).eval()


def component_spec(folder: Path, index: dict, name: str, variant: Optional[str],
                   dtype: torch.dtype, device: torch.device) -> dict:
    """What a worker needs to find or receive, and load, one component (see ComponentWorker)."""
    from cake.cluster.ray_cluster import hf_origin

    sub = folder / name
    files = component_files(sub, variant)
    library, class_name = index[name][:2]
    return {"name": name, "library": library, "class": class_name,
            "fingerprint": fingerprint(sub, files), "subfolder": name,
            "files": [str(f.relative_to(sub)) for f in files], "hf": hf_origin(folder),
            "variant": variant, "dtype": str(dtype).split(".")[-1],
            "device_type": device.type}


def manifest(sums: dict) -> bytes:
    """What the master's MAC covers: every shipped file's checksum."""
    return json.dumps(sums, sort_keys=True).encode()


def ship(folder: Path, spec: dict, send, secret: bytes) -> dict:
    """Send a component's files in chunks, send(relative name, offset, bytes); returns
    their checksums, which the worker checks before it keeps them, and puts in spec the MAC
    over them that only the cluster's master (secret: its link secret) can make."""
    sums = {}
    for relative in spec["files"]:
        h, offset = hashlib.sha256(), 0
        with open(folder / relative, "rb") as f:
            while True:  # the last chunk is short (empty for an empty file)
                chunk = f.read(CHUNK)
                h.update(chunk)
                send(relative, offset, chunk)
                offset += len(chunk)
                if len(chunk) < CHUNK:
                    break
        sums[relative] = h.hexdigest()
    spec["mac"] = keys.message_mac(secret, manifest(sums))
    return sums


# --- the stand-in on the master ----------------------------------------------------------

def moved(obj, device, cast: Optional[tuple] = None):
    """obj with every tensor inside it on device (and, with cast=(a, b), float tensors of
    dtype a in dtype b): tensors, lists, tuples, dicts, model outputs, and plain objects
    such as a VAE's latent distribution."""
    if isinstance(obj, torch.Tensor):
        dtype = cast[1] if cast and obj.dtype == cast[0] else None
        return obj.to(device=device, dtype=dtype)
    if isinstance(obj, (list, tuple)):
        items = [moved(x, device, cast) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        items = {k: moved(v, device, cast) for k, v in obj.items()}
        return items if type(obj) is dict else type(obj)(**items)  # a ModelOutput
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module,
                                                         torch.Generator)):
        if any(isinstance(v, torch.Tensor) for v in vars(obj).values()):
            out = copy.copy(obj)
            for k, v in vars(obj).items():
                setattr(out, k, moved(v, device, cast))
            return out
    return obj


class RemoteComponent:
    """Mixed in before the real class: computation goes to the worker, the rest (config,
    submodules, small buffers such as a VAE's batch-norm statistics) stays here."""

    _cake_link = None  # the ImageCluster
    _cake_name = ""

    @property
    def device(self) -> torch.device:
        return self._cake_device

    @property
    def dtype(self) -> torch.dtype:
        return self._cake_dtype

    def to(self, *args, **kwargs):
        """Devices stay as they are (the weights live on the worker); a dtype change, such as
        SDXL's VAE upcast to float32, happens on the worker too."""
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)),
                                            None)
        if dtype is not None and dtype != self._cake_dtype:
            self._cake_link.set_dtype(self._cake_name, dtype)
            torch.nn.Module.to(self, dtype=dtype)  # the skeleton's parameters say so too
            self._cake_dtype = dtype
        return self

    def forward(self, *args, **kwargs):
        return self._cake_link.call(self._cake_name, "forward", args, kwargs)


class RemoteCoder(RemoteComponent):
    """A VAE: encode (img2img) and decode run on the worker too."""

    def encode(self, *args, **kwargs):
        return self._cake_link.call(self._cake_name, "encode", args, kwargs)

    def decode(self, *args, **kwargs):
        return self._cake_link.call(self._cake_name, "decode", args, kwargs)


_remote_classes: dict = {}


def remote_class(cls):
    """A subclass of cls that diffusers registers as cls itself (same module and name), so
    model_index bookkeeping, type checks and AutoPipeline.from_pipe all see the real thing."""
    if cls not in _remote_classes:
        mixin = RemoteCoder if hasattr(cls, "decode") else RemoteComponent
        _remote_classes[cls] = type(cls.__name__, (mixin, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _remote_classes[cls]


def skeleton(cls, folder: Path, device, dtype: torch.dtype):
    """The component's module without its weights: parameters on the meta device, buffers
    real (persistent ones read from the checkpoint: pipelines read some, e.g. FLUX.2's VAE
    batch-norm statistics)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "load_config"):  # diffusers
            module = cls.from_config(cls.load_config(folder))
        else:  # transformers
            module = cls._from_config(cls.config_class.from_pretrained(folder))
    torch.nn.Module.to(module.eval(), dtype=dtype)  # meta parameters: only dtypes change
    params = {n for n, _ in module.named_parameters()}
    wanted = [n for n in module.state_dict() if n not in params]
    stored = _read_tensors(folder, wanted)
    for name, buf in list(module.named_buffers()):
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        value = stored.get(name, buf)
        sub._buffers[attr] = value.to(device=device, dtype=dtype if value.is_floating_point()
                                      else value.dtype)
    return module


def _read_tensors(folder: Path, names: list[str]) -> dict:
    if not names:
        return {}
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            out.update({n: st.get_tensor(n) for n in names if n in keys})
    return out


def stand_in(cls, folder: Path, name: str, link, device, dtype: torch.dtype):
    module = skeleton(cls, folder, device, dtype)
    module.__class__ = remote_class(cls)
    module._cake_link, module._cake_name = link, name
    module._cake_device, module._cake_dtype = torch.device(device), dtype
    return module


# --- the worker's actor ------------------------------------------------------------------

def cache_root() -> Path:
    return worker_cache("components")


class ComponentWorker(NodeWorker):
    """Runs in a Ray actor on a worker node: holds pipeline components and runs calls on
    them. spec (from the master): name, library, class, fingerprint, files (relative
    names), hf (repo and commit, or None), subfolder, variant, dtype and device type."""

    def __init__(self, name: str):
        super().__init__(name)
        self.modules: dict[str, torch.nn.Module] = {}
        self.dtypes: dict[str, tuple] = {}  # name -> (master's dtype, ours) now
        self.base: dict[str, tuple] = {}  # ... as loaded
        self.calls = 0

    def ping(self) -> dict:
        return {"calls": self.calls}

    # weights

    def _cached(self, spec: dict) -> Path:
        return cache_root() / spec["fingerprint"] / spec["name"]

    def _local_folder(self, spec: dict) -> Optional[tuple[Path, str]]:
        """The component in this machine's HF cache (same repo and commit), or a verified
        copy shipped earlier."""
        snapshot = hf_snapshot(spec.get("hf"), [f"{spec['subfolder']}/*"])
        if snapshot is not None:
            folder = snapshot / spec["subfolder"]
            if all((folder / f).is_file() for f in spec["files"]):
                return folder, "hf-cache"
        folder = self._cached(spec)
        manifest = folder / "manifest.json"
        if manifest.exists():
            sums = json.loads(manifest.read_text())
            if sorted(sums) == sorted(spec["files"]) and all(
                    file_sha256(folder / f) == h for f, h in sums.items()):
                return folder, "disk-cache"
            log.warning("cached %s fails its checksums; asking for a new copy", folder)
        return None

    def has_weights(self, spec: dict) -> bool:
        return self._local_folder(spec) is not None

    def receive(self, spec: dict, relative: str, offset: int, data: bytes) -> int:
        """One chunk of a shipped file, written where it goes once all are checked."""
        path = self._cached(spec).with_suffix(".partial") / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.write(data)
        return len(data)

    def load(self, spec: dict, sums: Optional[dict] = None) -> dict:
        """Load the component from local files or, with sums, from the files just shipped."""
        t0 = time.monotonic()
        if sums is not None:
            partial, folder = self._cached(spec).with_suffix(".partial"), self._cached(spec)
            bad = [f for f, h in sums.items() if file_sha256(partial / f) != h]
            if bad:
                raise RuntimeError(f"shipped files arrived corrupted: {', '.join(bad)}")
            if not keys.shipped_by_master(manifest(sums), spec.get("mac")):
                raise RuntimeError("shipped files fail their MAC: not sent by this cluster's "
                                   "master")
            (partial / "manifest.json").write_text(json.dumps(sums))
            shutil.rmtree(folder, ignore_errors=True)
            partial.replace(folder)
            source = "shipped"
        else:
            found = self._local_folder(spec)
            if found is None:
                raise RuntimeError("no local copy and none shipped")
            folder, source = found
        master = getattr(torch, spec["dtype"])
        # The master's dtype on the same kind of device (so a CPU cluster computes as one
        # CPU would), else what suits this device.
        if self.device.type == spec["device_type"]:
            dtype = master
        else:
            from cake.device import default_dtype
            dtype = default_dtype(str(self.device))
        cls = getattr(importlib.import_module(spec["library"]), spec["class"])
        module = load_component(cls, folder, dtype, self.device, spec.get("variant"))
        name = spec["name"]
        self.modules[name] = module
        self.dtypes[name] = self.base[name] = (master, dtype)
        return {"weights_from": source, "seconds": round(time.monotonic() - t0, 2),
                "dtype": str(dtype).split(".")[-1], "memory_bytes": sum(
                    t.numel() * t.element_size() for t in module.state_dict().values())}

    # calls

    def call(self, name: str, method: str, args: tuple, kwargs: dict):
        module = self.modules[name]
        master, ours = self.dtypes[name]
        args, kwargs = moved((args, kwargs), self.device, (master, ours))
        if method == "forward" and "logits_to_keep" in inspect.signature(
                module.forward).parameters:
            # A causal LM as a text encoder (FLUX.2's Qwen3): pipelines read its hidden
            # states, never its logits, which would be a vocabulary-wide tensor per token
            # to send back.
            kwargs.setdefault("logits_to_keep", 1)
        with torch.inference_mode():
            out = (module if method == "forward" else getattr(module, method))(*args, **kwargs)
        self.calls += 1
        return moved(out, "cpu", (ours, master))

    def set_dtype(self, name: str, dtype: torch.dtype) -> None:
        """The master moved the component to dtype: the master's own dtype means ours."""
        master, ours = self.base[name]
        self.dtypes[name] = (dtype, ours if dtype == master else dtype)
        self.modules[name].to(self.dtypes[name][1])


class ComponentActor(ComponentWorker):
    """The worker as a Ray actor process: it dies with its node, and uses its threads."""

    def __init__(self, name: str):
        actor_setup()
        super().__init__(name)


# --- the master's side -------------------------------------------------------------------

@dataclass
class Holder:
    """A worker holding components (WorkerRecord's fields, for the topology document)."""

    name: str
    node_id: str
    host: str
    actor: object = None
    components: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    description: str = ""
    status: str = "joining"
    detail: str = ""
    weights_from: str = ""

    def topology(self) -> dict:
        i = self.info
        held = self.components if self.status == "ready" else []
        return {"name": self.name, "host": self.host, "description": self.description,
                "layers": ",".join(held), "components": held,
                "vram_bytes": i.get("vram_bytes"), "tflops": i.get("tflops"),
                "backend": i.get("backend"), "hostname": i.get("hostname"), "os": i.get("os"),
                "device": i.get("device"), "status": self.status, "detail": self.detail,
                "weights_from": self.weights_from, "stage_pid": i.get("pid")}


class ImageCluster:
    """The master's view: which worker holds which component, the calls to them, and
    taking a lost worker's components back."""

    def __init__(self, folder: Path, index: dict, placement: dict[str, list[str]],
                 descriptions: dict, opts, device: str, dtype: torch.dtype,
                 variant: Optional[str]):
        from cake.cluster import ray_cluster as rc

        self.folder, self.index, self.opts = folder, index, opts
        self.device, self.dtype, self.variant = torch.device(device), dtype, variant
        self.holders: dict[str, Holder] = {}
        self.home: dict[str, str] = {}  # component -> the worker holding it
        self.events: list[dict] = []
        self.head, self.master_ip = rc.start_master(opts)
        self._start(placement, descriptions)

    def _start(self, placement: dict, descriptions: dict) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from cake.cluster import ray_cluster as rc

        t0 = time.monotonic()
        nodes = {n["NodeName"]: n for n in rc.wait_for_workers(self.opts, set(placement))}
        actor_class = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)(ComponentActor)
        for name, components in placement.items():
            node = nodes.get(name)
            if node is None:
                log.warning("worker %s did not join: %s stay on the master", name,
                            ", ".join(components))
                self.holders[name] = Holder(name, "", "", None, components, status="missing",
                                            description=descriptions.get(name, ""))
                self.events.append({"time": time.time(), "event": "missing", "worker": name,
                                    "components": components})
                continue
            actor = actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node["NodeID"], soft=False)).remote(name)
            self.holders[name] = Holder(name, node["NodeID"], node["NodeManagerAddress"], actor,
                                        components, description=descriptions.get(name, ""))
        for h in self.holders.values():
            if h.status == "missing":
                continue
            try:
                h.info = ray.get(h.actor.describe.remote(), timeout=120)
                h.description = h.description or h.info.get("device", "")
                sources = [self._load_on(h, c) for c in h.components]
            except Exception as e:  # its components stay here
                log.warning("worker %s could not load %s (%s): they stay on the master",
                            h.name, ", ".join(h.components), e)
                h.status, h.detail = "failed", f"{type(e).__name__}: {e}"
                ray.kill(h.actor)  # and what it did load goes with it
                continue
            h.status, h.weights_from = "ready", ",".join(sorted(set(sources)))
            self.home.update({c: h.name for c in h.components})
        placed = {h.name: h.components for h in self.holders.values() if h.status == "ready"}
        log.info("components placed in %.1fs: %s", time.monotonic() - t0,
                 "; ".join(f"{w}: {', '.join(c)}" for w, c in placed.items()) or "none")
        self.events.append({"time": time.time(), "event": "placed", "components": placed,
                            "seconds": round(time.monotonic() - t0, 2)})

    def _load_on(self, holder: Holder, name: str) -> str:
        """Have the worker load one component, shipping its files unless it has them."""
        import ray

        spec = component_spec(self.folder, self.index, name, self.variant, self.dtype,
                              self.device)
        sums = None
        if not ray.get(holder.actor.has_weights.remote(spec), timeout=600):
            log.info("shipping %s to %s", name, holder.name)
            sums = ship(self.folder / name, spec, lambda *chunk: ray.get(
                holder.actor.receive.remote(spec, *chunk), timeout=600),
                keys.link_secret(self.opts.key))
        result = ray.get(holder.actor.load.remote(spec, sums), timeout=1800)
        log.info("%s on %s (%s, %s, %.1fs)", name, holder.name, result["weights_from"],
                 result["dtype"], result["seconds"])
        return result["weights_from"]

    def stand_ins(self) -> dict:
        return {name: stand_in(component_class(self.index, name), self.folder / name, name,
                               self, self.device, self.dtype) for name in self.home}

    # calls from the stand-ins (the render thread)

    def call(self, name: str, method: str, args: tuple, kwargs: dict):
        holder = self.holders[self.home[name]]
        ref = holder.actor.call.remote(name, method, *moved((args, kwargs), "cpu"))
        return moved(self._result(holder, ref), self.device)

    def set_dtype(self, name: str, dtype: torch.dtype) -> None:
        holder = self.holders[self.home[name]]
        self._result(holder, holder.actor.set_dtype.remote(name, dtype))

    def _result(self, holder: Holder, ref):
        """The call's result; ComponentLost when its worker dies or stops answering (a
        slow call on a live worker is waited for: a big VAE decode takes a while)."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        while True:
            ready, _ = ray.wait([ref], timeout=self.opts.worker_timeout)
            if ready:
                try:
                    return ray.get(ref)
                except RayTaskError as e:  # the component's own error: as if it ran here
                    raise e.as_instanceof_cause() from None
                except RayError as e:
                    raise self._lost(holder, f"{type(e).__name__}: {e}") from e
            try:
                ray.get(holder.actor.ping.remote(), timeout=10)
            except Exception as e:
                raise self._lost(holder, f"no answer for {self.opts.worker_timeout:.0f}s "
                                         f"({type(e).__name__})") from e

    def _lost(self, holder: Holder, error: str) -> ComponentLost:
        holder.status, holder.detail = "lost", error.splitlines()[0][:300]
        return ComponentLost(holder.name, holder.detail)

    def take_back(self, worker: str, pipe) -> list[str]:
        """Load a lost worker's components here, from the master's own files."""
        import ray

        t0 = time.monotonic()
        holder = self.holders[worker]
        names = [c for c, w in self.home.items() if w == worker]
        for name in names:
            module = load_component(component_class(self.index, name), self.folder / name,
                                    self.dtype, self.device, self.variant)
            setattr(pipe, name, module)
            del self.home[name]
        try:
            ray.kill(holder.actor)
        except Exception as e:  # most often already dead with its node
            log.info("ending %s's actor: %s", worker, e)
        holder.status = "lost"
        self.events.append({"time": time.time(), "event": "taken back", "worker": worker,
                            "components": names, "error": holder.detail,
                            "seconds": round(time.monotonic() - t0, 2)})
        return names

    # reporting and shutdown

    def topology_workers(self) -> list[dict]:
        return [h.topology() for h in self.holders.values()]

    def close(self) -> None:
        from cake.cluster.ray_cluster import stop_master

        stop_master(self.head, [h.actor for h in self.holders.values()])


class ClusterImageModel(ImageModel):
    """ImageModel whose pipeline has stand-ins for components on workers."""

    def __init__(self, pipe, arch, model_id: str, cluster: ImageCluster, **defaults):
        self.cluster = cluster
        super().__init__(pipe, arch, model_id, **defaults)

    def generate(self, job) -> list[bytes]:
        while True:
            try:
                return super().generate(job)
            except ComponentLost as e:
                log.warning("image %d: %s; loading its components here and rendering the "
                            "image again from its first step", job.id, e)
                names = self.cluster.take_back(e.worker, self.pipe)
                self._img2img = None  # it holds the stand-ins
                log.warning("image %d: %s now run on the master", job.id, ", ".join(names))

    def topology(self) -> dict:
        doc = super().topology()
        home = self.cluster.home
        details = doc["layer_details"]
        for name, entry in details.items():
            entry["node"] = home.get(name, "master")
        local = [n for n in details if n not in home]
        doc["master"]["layers"] = ",".join(local)
        doc["master"]["memory_used_bytes"] = sum(details[n]["total_bytes"] for n in local)
        doc["workers"] = self.cluster.topology_workers()
        doc["events"] = self.cluster.events
        return doc

    def close(self) -> None:
        super().close()
        self.cluster.close()


def start_cluster(path: Path, opts, device: str, dtype: torch.dtype) -> Optional[ImageCluster]:
    """The cluster --cluster-key and --topology ask for: None when the topology places no
    component (this node holds the whole pipeline, as Cake's default is)."""
    from cake.cluster.ray_cluster import ClusterError
    from cake.image.loader import fp16_only, model_index

    if not opts.topology:
        log.info("no --topology places components (unet, clip, clip2, t5, vae, transformer, "
                 "...) on workers: this node holds the whole pipeline")
        return None
    if path.is_file():
        raise ValueError(f"components can be placed on workers from a diffusers folder; {path} "
                         "is a single-file checkpoint")
    index = model_index(path)
    placement, descriptions = read_placement(opts.topology, index)
    if not placement:
        log.info("the topology places no component: this node holds the whole pipeline")
        return None
    try:
        return ImageCluster(path, index, placement, descriptions, opts, device, dtype,
                            "fp16" if fp16_only(path) else None)
    except ClusterError as e:
        raise ValueError(str(e)) from e
