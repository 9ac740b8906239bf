"""Cluster flags of `cake serve`, and the options they make."""
from __future__ import annotations

import os


def add_args(p) -> None:
    g = p.add_argument_group("cluster (spread the model's layers over workers)")
    g.add_argument("--cluster-key", default=os.environ.get("CAKE_CLUSTER_KEY"),
                   help="shared secret of the cluster; enables cluster mode "
                        "(default: $CAKE_CLUSTER_KEY)")
    g.add_argument("--cluster-address", default="0.0.0.0:10128",
                   help="HOST:PORT where workers join this master")
    g.add_argument("--min-workers", type=int, default=1,
                   help="start as soon as this many workers joined")
    g.add_argument("--discovery-timeout", type=float, default=10.0,
                   help="seconds to wait for workers; with none, serve alone")
    g.add_argument("--topology", help="Cake's topology.yml: fixed layer ranges per worker "
                                      "(nodes with no layers are placed automatically)")
    g.add_argument("--worker-timeout", type=float, default=30.0,
                   help="a worker making no progress this long is replaced")
    g.add_argument("--pipeline-depth", type=int, default=0,
                   help="groups of requests in flight through the stages at once "
                        "(default: one per machine)")
    g.add_argument("--cluster-insecure", action="store_true",
                   help="send hidden states between machines unencrypted (only over links "
                        "you trust: anyone on the network could read or alter them)")


def options(args):
    """ClusterOptions when the command line asks for a cluster (a key), else None."""
    from cake.cluster.ray_cluster import ClusterOptions

    key = getattr(args, "cluster_key", None)
    if not key:
        if getattr(args, "topology", None):
            raise SystemExit("cake: --topology needs --cluster-key (or CAKE_CLUSTER_KEY)")
        return None
    from cake.cluster.ray_cluster import (ClusterError, is_loopback, lan_ip,
                                          share_cores_politely, split_address)

    if args.cluster_insecure:
        import logging

        logging.getLogger("cake").warning(
            "--cluster-insecure: the cluster's hidden states and token ids cross the network "
            "in plaintext; anyone on it can read or alter them")
    host = split_address(args.cluster_address)[0]
    if is_loopback(host):  # workers share this machine
        share_cores_politely()
    elif host in ("", "0.0.0.0"):
        try:
            lan_ip()  # the address workers are told; fail now, and clearly, if there is none
        except ClusterError as e:
            raise SystemExit(f"cake: {e}") from e
    return ClusterOptions(key=key, address=args.cluster_address, min_workers=args.min_workers,
                          discovery_timeout=args.discovery_timeout,
                          worker_timeout=args.worker_timeout, topology=args.topology,
                          pipeline_depth=args.pipeline_depth,
                          insecure=args.cluster_insecure)
