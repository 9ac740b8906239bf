"""The mDNS record a master advertises: it names the cluster by a short hash of the key and
carries neither the key nor the Ray token derived from it. (Multicast itself is not exercised:
tests stay on 127.0.0.1, and loopback has no multicast here.)"""
from __future__ import annotations

import pytest

pytest.importorskip("zeroconf")

from cake.cluster.discovery import SERVICE, service_record  # noqa: E402
from cake.cluster.ray_cluster import cluster_id, ray_token  # noqa: E402


def test_record_carries_only_a_hash_of_the_key():
    key = "correct horse battery staple"
    info = service_record(key, "192.0.2.10", 10128)
    assert info.type == SERVICE and info.port == 10128
    assert info.parsed_addresses() == ["192.0.2.10"]
    props = {k.decode(): v.decode() for k, v in info.properties.items()}
    assert props["cluster"] == cluster_id(key) and len(props["cluster"]) == 12
    everything = info.name + "".join(props.values())
    assert key not in everything and ray_token(key) not in everything
    assert ray_token(key)[:12] != cluster_id(key)  # the public tag is no part of the token


def test_keys_make_distinct_clusters_and_tokens():
    assert cluster_id("a") != cluster_id("b")
    assert ray_token("a") != ray_token("b")
    assert ray_token("a") == ray_token("a")
