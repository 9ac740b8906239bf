"""Zero-config discovery over mDNS (zeroconf): the master advertises where workers join;
workers started with the same key find it. The record carries only a short hash of the key
(cluster_id), never the key or the token derived from it."""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Optional

from cake.cluster.ray_cluster import cluster_id

log = logging.getLogger(__name__)

SERVICE = "_cake._tcp.local."
_advertised: list = []  # keep the Zeroconf instances alive as long as the process


def service_record(key: str, ip: str, port: int):
    from zeroconf import ServiceInfo

    cid = cluster_id(key)
    return ServiceInfo(SERVICE, f"cake-{cid}-{socket.gethostname()}.{SERVICE}",
                       addresses=[socket.inet_aton(ip)], port=port,
                       properties={"cluster": cid, "version": "1"})


def advertise(key: str, ip: str, port: int) -> None:
    from zeroconf import Zeroconf

    zc = Zeroconf(interfaces=[ip])
    zc.register_service(service_record(key, ip, port))
    _advertised.append(zc)
    log.info("advertising the cluster over mDNS on %s", ip)


def find_master(key: str, timeout: Optional[float] = None) -> Optional[str]:
    """HOST:PORT of a master advertising this key's cluster id; None after timeout (forever
    when timeout is None)."""
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    cid = cluster_id(key)
    found: list[str] = []
    event = threading.Event()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is not ServiceStateChange.Added:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info is None or (info.properties or {}).get(b"cluster") != cid.encode():
            return
        addrs = info.parsed_addresses()
        if addrs:
            found.append(f"{addrs[0]}:{info.port}")
            event.set()

    zc = Zeroconf()
    try:
        ServiceBrowser(zc, SERVICE, handlers=[on_change])
        deadline = None if timeout is None else time.monotonic() + timeout
        while not event.wait(1.0):
            if deadline is not None and time.monotonic() > deadline:
                return None
        return found[0]
    finally:
        zc.close()
