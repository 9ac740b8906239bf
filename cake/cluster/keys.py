"""Keys derived from the cluster key, which never leaves the processes started with it.

- Ray's auth token (ray_cluster.ray_token) guards the control plane.
- The link secret is the root of the data plane's keys: one AES-256-GCM key per direction of
  each link of each ring (link_key, with a fresh salt per ring), and the MAC that shipped
  weights carry (message_mac). configure_ray_env puts it in a node's environment for that
  node's actors (own_link_secret).
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Optional

LINK_SECRET_ENV = "CAKE_LINK_SECRET"


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def link_secret(key: str) -> bytes:
    return _hkdf(key.encode(), b"cake/link-secret", b"")


def own_link_secret() -> bytes:
    """The link secret inside a Ray actor on this node (inherited from the node's process)."""
    value = os.environ.get(LINK_SECRET_ENV)
    if not value:
        raise RuntimeError("this node's environment holds no link secret (was it started by "
                           "`cake worker`?)")
    return bytes.fromhex(value)


def link_key(secret: bytes, salt: bytes, src: int, dst: int) -> bytes:
    """The key of the direction src -> dst of one ring's links."""
    return _hkdf(secret, salt, f"cake/link/{src}->{dst}".encode())


def message_mac(secret: bytes, data: bytes) -> str:
    """Authenticates shipped weights: only a holder of the cluster key can make it."""
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def shipped_by_master(data: bytes, mac: Optional[str]) -> bool:
    """Whether data carries the MAC of this cluster (checked in a worker's actor)."""
    return mac is not None and hmac.compare_digest(message_mac(own_link_secret(), data), mac)
