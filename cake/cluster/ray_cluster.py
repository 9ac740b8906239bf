"""The control plane on Ray: start or join the cluster with a token derived from the cluster
key, find the workers, place layers, start a stage actor per worker, ship weights, and put
it all back together when a worker is lost.

Ray runs in-process (a head node inside `cake serve`, a worker node inside `cake worker`):
its processes die with ours (kernel fate-sharing), and a loopback cluster keeps every socket
on 127.0.0.1.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cake.cluster import keys

log = logging.getLogger(__name__)

DEFAULT_PORT = 10128
WORKER_RESOURCE = "cake_worker"


class ClusterError(RuntimeError):
    pass


class WrongKey(ClusterError):
    pass


@dataclass
class ClusterOptions:
    key: str
    address: str = f"0.0.0.0:{DEFAULT_PORT}"  # where workers join the master
    min_workers: int = 1
    discovery_timeout: float = 10.0
    worker_timeout: float = 30.0
    topology: Optional[str] = None  # Cake's topology.yml
    advertise: bool = True  # mDNS
    pipeline_depth: int = 0  # steps in flight through the ring; 0: one per machine
    insecure: bool = False  # plaintext data plane (--cluster-insecure)


# --- the key ------------------------------------------------------------------------------

def ray_token(key: str) -> str:
    """Ray's auth token, derived from the key so that the key itself never travels."""
    return hashlib.sha256(b"cake/ray-token/" + key.encode()).hexdigest()


def cluster_id(key: str) -> str:
    """The short public tag in the mDNS record: tells clusters apart, reveals nothing."""
    return hashlib.sha256(b"cake/cluster-id/" + key.encode()).hexdigest()[:12]


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def configure_ray_env(key: str, loopback: bool) -> None:
    """Environment Ray reads at import: token auth, no usage stats, the token file in a
    private temp dir (not ~/.ray), and for a loopback cluster no rewriting of 127.0.0.1 into
    the machine's LAN address; and the link secret, for this node's stage actors."""
    token_dir = Path(tempfile.mkdtemp(prefix="cake-ray-"))
    atexit.register(shutil.rmtree, token_dir, ignore_errors=True)
    (token_dir / "auth_token").write_text(ray_token(key))
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token(key),
                       "RAY_AUTH_TOKEN_PATH": str(token_dir / "auth_token"),
                       "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
                       keys.LINK_SECRET_ENV: keys.link_secret(key).hex()})
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        share_cores_politely()


def share_cores_politely() -> None:
    """Stages on one machine take turns on its cores: OpenMP threads that spin while their
    stage waits would starve the stage that works (measured: 4 streams at 0.4x of one process
    with spinning, 0.9x without). Read when the OpenMP runtime loads, so set before torch is."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def local_ip_for(host: str) -> str:
    """This machine's address as seen on the route to host."""
    if is_loopback(host) or host in ("", "0.0.0.0"):
        return "127.0.0.1" if is_loopback(host) else lan_ip()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


def lan_ip() -> str:
    """The address other machines reach this one at, for a master listening on every
    interface: the one on the default route, else the only non-loopback IPv4 address. Never
    127.0.0.1: advertised to other machines, it would send their workers to themselves."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 9))  # picks the default route; sends nothing
            ip = s.getsockname()[0]
            if not is_loopback(ip):
                return ip
    except OSError:  # no default route
        pass
    import ifaddr

    found = sorted({a.ip for adapter in ifaddr.get_adapters() for a in adapter.ips
                    if a.is_IPv4 and not is_loopback(a.ip) and not a.ip.startswith("169.254.")})
    if len(found) == 1:
        return found[0]
    if not found:
        raise ClusterError("this machine has no network address but loopback: pass "
                           "--cluster-address HOST:PORT (127.0.0.1:PORT for workers on this "
                           "machine only)")
    raise ClusterError(f"no default route, and several addresses ({', '.join(found)}): pass "
                       "--cluster-address with the one the workers can reach")


def default_worker_name() -> str:
    """The hostname plus a short id: workers in containers on one host share a hostname."""
    import uuid

    return f"{socket.gethostname()}-{uuid.uuid4().hex[:4]}"


def split_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host:
        return address, default_port
    return host.strip("[]"), int(port)


# Ray starts worker processes, so our stage actors, at nice 15: any daemon or desktop program
# that wakes up on the node would preempt the stage that every token waits for. They run at
# the niceness of `cake serve` itself (0).
# Ray's background work shares each node's cores with the stage (an idle 2-node cluster
# used ~12% of a core): none of what follows serves a fixed ring of stages. No log monitor
# (nothing is logged to the driver), no autoscaler monitor on the head, no worker process
# started ahead of a task, no metrics or event statistics, and no memory monitor (Ray's OOM
# killer would kill a stage mid-stream; the pipeline replaces lost stages itself). The
# workers' raylets take this config from the head.
QUIET_NODE = {"include_log_monitor": False}
QUIET_CLUSTER = {"worker_niceness": 0,
                 "prestart_worker_first_driver": False, "memory_monitor_refresh_ms": 0,
                 "enable_metrics_collection": False, "event_stats": False}


def _node(params, head: bool):
    import ray._private.node

    return ray._private.node.Node(params, head=head, shutdown_at_exit=True, spawn_reaper=True)


def start_head(address: str):
    """A Ray head node listening for workers at address; returns (node, gcs address)."""
    import ray._private.parameter

    host, port = split_address(address)
    node_ip = "127.0.0.1" if is_loopback(host) else (host if host != "0.0.0.0" else lan_ip())
    params = ray._private.parameter.RayParams(
        node_ip_address=node_ip, node_name="master", gcs_server_port=port, num_cpus=1,
        include_dashboard=False, resources={"cake_master": 1}, **QUIET_NODE,
        no_monitor=True, _system_config=QUIET_CLUSTER)
    try:
        node = _node(params, head=True)
    except Exception as e:
        raise ClusterError(f"cannot listen for workers at {address}: {e}") from e
    return node, f"{node_ip}:{port}"


def start_master(opts: ClusterOptions):
    """Start the head node, connect this process to it and advertise it (mDNS) unless it
    listens on loopback; returns (head node, the master's IP)."""
    host, port = split_address(opts.address)
    configure_ray_env(opts.key, is_loopback(host))  # before Ray is imported
    import ray

    head, gcs = start_head(opts.address)
    master_ip = gcs.rpartition(":")[0]
    print(f"cake: cluster master listening for workers at {gcs} "
          f"(join with: cake worker --join {gcs} --cluster-key ...)", flush=True)
    ray.init(address=gcs, _node_ip_address=master_ip, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=False)
    if opts.advertise and not is_loopback(host):
        from cake.cluster.discovery import advertise

        advertise(opts.key, master_ip, port)
    return head, master_ip


def check_key(gcs_address: str, timeout: float = 5.0) -> None:
    """Fail fast and clearly on a wrong key (Ray alone retries ~20 s, then says
    ConnectionError)."""
    from ray._raylet import GcsClient

    try:
        GcsClient(address=gcs_address).internal_kv_get(b"cake", None, timeout=timeout)
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if "Auth" in text or "token" in text.lower():
            raise WrongKey(f"the master at {gcs_address} refused this worker: wrong "
                               "cluster key (use the same --cluster-key as the master)") from e
        raise ClusterError(f"cannot reach a master at {gcs_address}: {e}") from e


def start_worker_node(gcs_address: str, name: str, node_ip: str):
    import psutil
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        node_ip_address=node_ip, node_name=name, gcs_address=gcs_address, num_cpus=1,
        resources={WORKER_RESOURCE: 1}, **QUIET_NODE)
    try:
        return _node(params, head=False)
    except Exception as e:
        # A half-started node leaves its processes (our children) behind: end them.
        for child in psutil.Process().children(recursive=True):
            child.kill()
        raise ClusterError(f"could not start this worker's Ray node: {e}") from e


# --- the master's view of the cluster ----------------------------------------------------

@dataclass
class WorkerRecord:
    name: str
    node_id: str
    host: str
    actor: object = None
    info: dict = field(default_factory=dict)
    description: str = ""
    rank: int = 0
    layers: tuple[int, int] = (0, 0)
    status: str = "joining"
    detail: str = ""
    weights_from: str = ""

    def topology(self) -> dict:
        from cake.cluster.topology import layer_range

        i = self.info
        return {"name": self.name, "host": self.host, "description": self.description,
                "layers": layer_range(*self.layers) if self.status == "ready" else "",
                "vram_bytes": i.get("vram_bytes"), "tflops": i.get("tflops"),
                "backend": i.get("backend"), "hostname": i.get("hostname"), "os": i.get("os"),
                "device": i.get("device"), "status": self.status, "detail": self.detail,
                "weights_from": self.weights_from, "stage_pid": i.get("pid")}


def alive_workers() -> list[dict]:
    import ray

    return [n for n in ray.nodes()
            if n["Alive"] and n.get("Resources", {}).get(WORKER_RESOURCE)]


def wait_for_workers(opts: ClusterOptions, wanted: Optional[set[str]] = None) -> list[dict]:
    """Ray nodes of the workers that joined: as soon as min_workers (or every node the
    topology file names) have, else whatever joined by the discovery timeout."""
    deadline = time.monotonic() + opts.discovery_timeout
    while True:
        nodes = alive_workers()
        names = {n["NodeName"] for n in nodes}
        enough = wanted <= names if wanted else len(nodes) >= max(1, opts.min_workers)
        if enough or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if wanted and not wanted <= names:
        log.warning("topology nodes missing after %.0fs: %s", opts.discovery_timeout,
                    ", ".join(sorted(wanted - names)))
    elif len(nodes) < opts.min_workers:
        log.warning("%d of %d workers joined in %.0fs; going on with them", len(nodes),
                    opts.min_workers, opts.discovery_timeout)
    return nodes


def stage_actor_class():
    import ray

    from cake.cluster.stage import StageWorker

    # A stage's loop thread runs beside the actor's method calls (ping, describe).
    return ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)(StageWorker)


def spawn_stage(node: dict) -> WorkerRecord:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = stage_actor_class().options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        name=None).remote(node["NodeName"])
    return WorkerRecord(node["NodeName"], node["NodeID"], node["NodeManagerAddress"], actor)


def model_fingerprint(checkpoint) -> str:
    """Identifies a model's weights cheaply: config, file sizes, and the first and last MiB
    of every weight file (two fine-tunes of one architecture differ there)."""
    h = hashlib.sha256(json.dumps(checkpoint.config, sort_keys=True, default=str).encode())
    for f in checkpoint.files():
        hash_file_ends(h, f, f.name)
    return h.hexdigest()[:32]


def hash_file_ends(h, path: Path, label: str) -> None:
    """Feed a file's label and size, and its first and last MiB, into the hash h."""
    size = path.stat().st_size
    h.update(f"{label}:{size}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))


def stop_master(head_node, actors) -> None:
    """End the master's actors, leave Ray and stop the head node's processes."""
    import ray

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception as e:  # most often already gone with its worker
            log.info("ending actor %s: %s", actor, e)
    try:
        ray.shutdown()
    finally:
        head_node.kill_all_processes(check_alive=False, allow_graceful=True)


def hf_origin(path) -> Optional[dict]:
    """repo id and commit when the model sits in a Hugging Face cache snapshot."""
    parts = Path(path).resolve().parts
    for i, p in enumerate(parts):
        if p.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return {"repo_id": p[len("models--"):].replace("--", "/"), "revision": parts[i + 2]}
    return None


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
