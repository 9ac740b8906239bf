"""What every cake actor on a worker node shares, text stage or image component: its name
and device, a description of its node, how it sets itself up in a Ray actor, and where it
finds weights (this machine's HF cache, or copies the master shipped earlier)."""
from __future__ import annotations

import logging
import os
import platform
import socket
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)


def worker_cache(kind: str) -> Path:
    """Where shipped weights are kept on a worker ("stages", "components")."""
    return Path(os.environ.get("CAKE_CACHE", Path.home() / ".cache" / "cake")) / kind


def hf_snapshot(hf: Optional[dict], patterns: list[str]) -> Optional[Path]:
    """The master's model (repo id and commit) in this machine's HF cache, or None."""
    if not hf:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hf["repo_id"], revision=hf["revision"],
                                      local_files_only=True, allow_patterns=patterns))
    except Exception as e:  # not cached here (LocalEntryNotFoundError and kin): shipped weights
        log.info("%s@%s is not in this machine's HF cache (%s: %s)", hf["repo_id"],
                 hf["revision"], type(e).__name__, e)
        return None


def _die_with_parent() -> None:
    """Ray starts actors under the node's raylet; when the worker process (and with it the
    raylet) is killed, take the actor down too, or it would keep serving its peers."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass  # not Linux: the actor ends when Ray notices its node is gone


def actor_threads() -> int:
    """Ray gives an actor that reserves no CPU one OpenMP thread; an actor should use the
    threads the worker process was given (OMP_NUM_THREADS), else every core it may run on."""
    try:
        import psutil

        wanted = psutil.Process().parent().environ().get("OMP_NUM_THREADS")  # the raylet
        if wanted:
            return max(1, int(wanted))
    except Exception as e:  # no psutil, no parent, a bad value: every allowed core
        log.info("cannot read the worker's OMP_NUM_THREADS (%s); using every allowed core", e)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def actor_setup() -> None:
    """What every cake actor on a worker does first: die with its node, use its cores."""
    _die_with_parent()
    torch.set_num_threads(actor_threads())


def node_info(device: torch.device) -> dict:
    from cake.cluster.topology import backend_name, device_memory, measured_tflops

    return {"device": str(device), "backend": backend_name(device),
            "vram_bytes": device_memory(device), "hostname": socket.gethostname(),
            "os": f"{platform.system()} {platform.release()}".strip(), "pid": os.getpid(),
            "threads": torch.get_num_threads(), "tflops": measured_tflops(str(device))}


class NodeWorker:
    """The base of a worker's actors: a name and the best device of its node."""

    def __init__(self, name: str):
        from cake.device import best_device

        self.name = name
        self.device = torch.device(best_device())

    def describe(self) -> dict:
        return {"name": self.name, **node_info(self.device)}
