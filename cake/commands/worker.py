"""`cake worker --cluster-key K [--name N] [--join HOST:PORT]`: lend this machine's memory
to a master: join its cluster and run the layers it places here."""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)


def add_worker_args(p, name_flag: bool = True) -> None:
    p.add_argument("--cluster-key", default=os.environ.get("CAKE_CLUSTER_KEY"),
                   help="the master's cluster key (default: $CAKE_CLUSTER_KEY)")
    if name_flag:
        p.add_argument("--name", default=None,
                       help="this worker's name, as a --topology file names it (default: "
                            "the hostname plus a short id)")
    p.add_argument("--join", metavar="HOST:PORT",
                   help="the master's cluster address (default: find it over mDNS)")


def register(sub) -> None:
    p = sub.add_parser("worker", help="join a master's cluster and hold some of its layers")
    add_worker_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from cake.cluster import ray_cluster as rc

    if not args.cluster_key:
        raise SystemExit("cake: a worker needs --cluster-key (or CAKE_CLUSTER_KEY)")
    args.name = args.name or rc.default_worker_name()
    while True:
        address = args.join or _discover(args.cluster_key)
        host, port = rc.split_address(address)
        rc.configure_ray_env(args.cluster_key, rc.is_loopback(host))
        gcs = f"{host}:{port}"
        try:
            rc.check_key(gcs)
            node = rc.start_worker_node(gcs, args.name, rc.local_ip_for(host))
        except rc.WrongKey as e:
            print(f"cake: {e}", file=sys.stderr, flush=True)
            if args.join:
                return 1
            time.sleep(5)
            continue
        except rc.ClusterError as e:  # no master there (yet): keep looking
            log.info("%s; retrying", e)
            time.sleep(2)
            continue
        print(f"cake: worker {args.name} joined the cluster at {gcs}", flush=True)
        _serve_until_master_leaves(gcs)
        node.kill_all_processes(check_alive=False, allow_graceful=True)
        print(f"cake: the master at {gcs} went away", flush=True)


def _discover(key: str) -> str:
    from cake.cluster.discovery import find_master

    print("cake: looking for a master with this cluster key (mDNS)...", flush=True)
    address = find_master(key)
    print(f"cake: found a master at {address}", flush=True)
    return address


def _serve_until_master_leaves(gcs: str, misses_allowed: int = 5) -> None:
    """Ray runs the stage actors in its own processes; this process only watches the master."""
    from ray._raylet import GcsClient

    client = GcsClient(address=gcs)
    misses = 0
    while misses < misses_allowed:
        time.sleep(2)
        try:
            client.internal_kv_get(b"cake", None, timeout=3)
            misses = 0
        except Exception:
            misses += 1
