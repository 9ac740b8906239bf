"""A stage on a worker: a contiguous range of decoder layers, their KV cache, and the loop
that takes hidden states from the previous rank and hands them to the next.

Weights come from, in order: the worker's own Hugging Face cache when it holds the same
model (same repo and commit), a bundle of exactly this range's tensors that the master shipped
earlier (kept on disk by model hash and layer range, verified by checksum before reuse), or a
fresh shipment through Ray's object store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cake.cluster.worker import NodeWorker, actor_setup, hf_snapshot, worker_cache

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return worker_cache("stages")


# --- bundles: a layer range's tensors in one safetensors file -----------------------------

def make_bundle(checkpoint, names: list[str]) -> bytes:
    """Serialize tensors as a safetensors blob. GGUF tensors travel packed as they are in
    the file (4-bit types at about a sixth of fp32); metadata says how to unpack them."""
    from safetensors.torch import save

    tensors, meta = {}, {}
    for name in names:
        packed = checkpoint.raw(name)
        if packed is not None:
            qtype, data, shape = packed
            data = np.ascontiguousarray(data)
            meta[name] = json.dumps({"qtype": int(qtype), "shape": list(shape),
                                     "np_dtype": data.dtype.str, "data_shape": list(data.shape)})
            tensors[name] = torch.from_numpy(data.view(np.uint8).reshape(-1).copy())
        else:
            tensors[name] = checkpoint.get(name).contiguous()
    return save(tensors, metadata={"cake.packed": json.dumps(meta)})


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BundleCheckpoint:
    """A shipped bundle read back as a Checkpoint (cake.text.weights)."""

    def __init__(self, path: Path, config: dict):
        from safetensors import safe_open

        self.path, self.config = path, config
        self._file = safe_open(path, "pt")
        # GGUF tensors travel as the file's bytes: offered packed, as GGUFCheckpoint.raw does
        self._packed = {k: json.loads(v) for k, v in
                        json.loads((self._file.metadata() or {}).get("cake.packed", "{}")).items()}

    def tensor_names(self) -> list[str]:
        return list(self._file.keys())

    def tensor_info(self) -> dict:
        from gguf import GGMLQuantizationType

        from cake.text.weights import FLOAT_TYPES, TensorInfo, safetensors_info

        info = safetensors_info({n: self.path for n in self.tensor_names()})
        for name, m in self._packed.items():
            qtype = GGMLQuantizationType(m["qtype"]).name
            info[name] = TensorInfo(tuple(m["shape"]), qtype, info[name].n_bytes,
                                    qtype not in FLOAT_TYPES)
        return info

    def files(self) -> list[Path]:
        return [self.path]

    def read_sparsely(self) -> None:
        pass  # safetensors reads each tensor's own bytes

    def raw(self, name: str):
        if name not in self._packed:
            return None
        from gguf import GGMLQuantizationType

        m = self._packed[name]
        data = self._file.get_tensor(name).numpy().view(np.dtype(m["np_dtype"]))
        return GGMLQuantizationType(m["qtype"]), data.reshape(m["data_shape"]), tuple(m["shape"])

    def get(self, name: str) -> torch.Tensor:
        if name not in self._packed:
            return self._file.get_tensor(name)
        from gguf.quants import dequantize

        qtype, data, shape = self.raw(name)
        return torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32).reshape(shape))


def build_stage(checkpoint, start: int, end: int, dtype: torch.dtype, device: str,
                quant: Optional[str] = None):
    """Layers [start, end) without embeddings, final norm or head (those live on the master)."""
    from cake.text.loader import load_stage

    return load_stage(checkpoint, start, end, dtype=dtype, device=device, quant_mode=quant,
                      headless=True)


# --- the stage actor ---------------------------------------------------------------------

class StageWorker(NodeWorker):
    """Runs in a Ray actor on a worker node (see ray_cluster.StageActor)."""

    def __init__(self, name: str):
        actor_setup()
        super().__init__(name)
        self.model = self.cache = self.link = None
        self.thread: Optional[threading.Thread] = None
        self.steps_done = 0
        self.prefilled_tokens = 0  # positions of prompt-sized steps (T > 1) this stage ran
        self.error: Optional[str] = None
        self.weights_from = None

    def ping(self) -> dict:
        """The heartbeat the master asks for while a step is in flight."""
        return {"steps_done": self.steps_done, "error": self.error,
                "prefilled_tokens": self.prefilled_tokens,
                "running": bool(self.thread and self.thread.is_alive())}

    # weights

    def _bundle_path(self, spec: dict) -> Path:
        return cache_root() / spec["model_hash"] / f"{spec['start']}-{spec['end']}.safetensors"

    def _local_checkpoint(self, spec: dict):
        """The same model in this machine's HF cache, or a verified bundle on disk."""
        from cake.text.weights import open_checkpoint

        from cake.hub import TEXT_PATTERNS

        folder = hf_snapshot(spec.get("hf"), TEXT_PATTERNS)
        if folder is not None:
            try:
                checkpoint = open_checkpoint(folder)
                self.weights_from = "hf-cache"
                return checkpoint
            except (OSError, ValueError) as e:  # an incomplete snapshot: use shipped layers
                log.info("the HF cache's copy at %s is not usable (%s)", folder, e)
        path = self._bundle_path(spec)
        sums = path.with_suffix(".sha256")
        if path.exists() and sums.exists():
            if checksum(path.read_bytes()) == sums.read_text().strip():
                self.weights_from = "disk-cache"
                return BundleCheckpoint(path, spec["config"])
            log.warning("cached layers %s fail their checksum; asking for a new copy", path)
        return None

    def has_weights(self, spec: dict) -> bool:
        return self._local_checkpoint(spec) is not None

    def load(self, spec: dict, bundle: Optional[bytes] = None) -> dict:
        """Build the stage for spec's range, from local weights or the shipped bundle."""
        t0 = time.monotonic()
        checkpoint = None if bundle is not None else self._local_checkpoint(spec)
        if checkpoint is None:
            if bundle is None:
                raise RuntimeError("no local weights and none shipped")
            if checksum(bundle) != spec["checksum"]:
                raise RuntimeError("shipped layers arrived corrupted (checksum mismatch)")
            from cake.cluster.keys import shipped_by_master

            if not shipped_by_master(bundle, spec.get("mac")):
                raise RuntimeError("shipped layers fail their MAC: not sent by this cluster's "
                                   "master")
            path = self._bundle_path(spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(bundle)
            tmp.replace(path)
            path.with_suffix(".sha256").write_text(spec["checksum"])
            self.weights_from = "shipped"
            checkpoint = BundleCheckpoint(path, spec["config"])
        dtype = self.dtype = getattr(torch, spec["dtype"])
        self.model = build_stage(checkpoint, spec["start"], spec["end"], dtype, str(self.device),
                                 # The quantized kernels are CPU ones; other devices load dense.
                                 spec.get("quant") if self.device.type == "cpu" else "auto")
        return {"weights_from": self.weights_from, "seconds": time.monotonic() - t0,
                "memory_bytes": sum(t.numel() * t.element_size()
                                    for t in self.model.state_dict().values())}

    # data plane

    def start(self, rank: int, world: int, name: str, local_ip: str, prev: int, next_: int,
              num_blocks: int, block_size: int, max_len: int, join_timeout_s: float,
              backend: str, secure: bool, keep_cache: bool = False) -> bool:
        """Join the process group and run the receive loop in a thread. The KV cache is
        num_blocks blocks of block_size positions (block_size max_len: a slot cache);
        keep_cache: a new ring after another stage was lost keeps this one's cache."""
        from cake.cluster import transport
        from cake.cluster.keys import own_link_secret
        from cake.text.kv_cache import KVCache, serving_dtype

        args, dtype = self.model.args, self.dtype
        group = transport.Group(rank, world, name, local_ip, join_timeout_s, backend,
                                own_link_secret() if secure else None)
        layers = args.kv_layers(self.model.start, self.model.end)  # DeltaNet layers keep none
        kv = (args.num_key_value_heads, args.head_dim, serving_dtype(dtype, self.device),
              self.device)
        if not (keep_cache and self.cache is not None):
            self.cache = (KVCache(layers, num_blocks, max_len, *kv,
                                  windows={i: args.window(i) for i in layers})
                          if block_size >= max_len
                          else KVCache.pool(layers, num_blocks, block_size, *kv))
        link = transport.Link(group, args.hidden_size, dtype, self.device)
        self.link, self.prev, self.next = link, prev, next_
        link.post(prev)  # the first frame's receive, before the master can send it
        self.steps_done, self.error = 0, None  # the master counts steps per ring
        self.thread = threading.Thread(target=self._loop, args=(link, prev, next_),
                                       name="cake-stage", daemon=True)
        self.thread.start()
        return True

    @torch.inference_mode()
    def _loop(self, link, prev: int, next_: int) -> None:
        """Waits for the next step as long as the master lives (a lost master resets the
        connection); the master watches for a stage that hangs. Its own link: a loop of an
        abandoned ring (the master closed its streams) touches nothing of the new one."""
        from cake.cluster import transport

        try:
            while True:
                op, x, batch = link.recv(prev)
                if op == transport.OP_STOP:
                    if next_ != 0:
                        for work, _ in link.send_stop(next_):
                            work.wait()
                    return
                if op == transport.OP_RELEASE:  # x: the slots of finished sequences
                    for slot in x.tolist():
                        self.cache.release(slot)
                        self.model.release_sequence(slot, self.cache)
                    if next_ != 0:  # the chain's last stage answers the master, not this
                        for work, _ in link.send_release(next_, x.tolist()):
                            work.wait()
                    continue
                if batch.copies:  # copy-on-write of blocks forks shared
                    self.cache.copy_blocks(batch.copies)
                y = self.model(x, batch, self.cache)
                if x.shape[1] > 1:
                    self.prefilled_tokens += x.shape[0] * x.shape[1]
                for work, _ in link.send(next_, y, batch):
                    work.wait()
                if link is not self.link:
                    return
                self.steps_done += 1
        except transport.FrameRejected as e:  # tampered with, replayed, or another cluster's
            if link is not self.link:
                return
            self.error = f"rejected a frame from rank {self.prev}: {e}"
            log.error("stage loop ended: %s", self.error)
        except Exception as e:  # a peer died
            if link is not self.link:  # the old ring's: the new one is fine
                return
            self.error = f"{type(e).__name__}: {e}"
            log.warning("stage loop ended: %s", self.error)
        finally:  # the next stage's loop on this ring ends too
            link.group.close()
