"""Layer placement: a pure function, on heterogeneous clusters and Cake's topology.yml."""
from __future__ import annotations

import pytest

from cake.cluster.placement import (GiB, NodeSpec, PlacementError, dump_topology, load_topology,
                                    parse_layers, place, usable_memory)


def covers(segments, num_layers):
    """Ordered, contiguous, every layer exactly once."""
    pos = 0
    for s in segments:
        assert s.start == pos and s.end > s.start
        pos = s.end
    return pos == num_layers


def held(segments, node):
    return sum(s.size for s in segments if s.node == node)


def test_equal_nodes_split_evenly():
    nodes = [NodeSpec("master", 10 * GiB, True), NodeSpec("a", 10 * GiB), NodeSpec("b", 10 * GiB)]
    segs = place(nodes, [GiB // 10] * 30)
    assert covers(segs, 30)
    assert [(s.node, s.start, s.end) for s in segs] == [
        ("master", 0, 10), ("a", 10, 20), ("b", 20, 30)]


def test_70b_like_over_eight_heterogeneous_nodes():
    # Llama-3-70B in bf16: 80 layers of ~1.71 GB, embeddings + head ~2.1 GB.
    layer = int(1.71e9)
    mem = {"master": 24, "w1": 24, "w2": 16, "w3": 12, "w4": 48, "w5": 8, "w6": 24, "w7": 40}
    nodes = [NodeSpec(n, usable_memory(g * GiB), n == "master") for n, g in mem.items()]
    segs = place(nodes, [layer] * 80, master_extra_bytes=int(2.1e9))
    assert covers(segs, 80)
    for n in nodes:  # nothing beyond what a node holds (the master's head included)
        extra = int(2.1e9) if n.is_master else 0
        assert held(segs, n.name) * layer + extra <= n.memory_bytes
    # More memory never means fewer layers (proportional shares, up to rounding).
    by_mem = sorted(nodes, key=lambda n: n.memory_bytes)
    counts = [held(segs, n.name) for n in by_mem]
    assert counts == sorted(counts)
    assert held(segs, "w4") > 2 * held(segs, "w5")


def test_capacity_caps_a_node_and_the_others_take_the_rest():
    # The master's proportional share (16 of 40) does not fit beside its embeddings and head.
    nodes = [NodeSpec("master", 20 * GiB, True), NodeSpec("small", 10 * GiB),
             NodeSpec("big", 20 * GiB)]
    segs = place(nodes, [GiB] * 40, master_extra_bytes=10 * GiB)
    assert covers(segs, 40)
    assert [held(segs, n) for n in ("master", "small", "big")] == [10, 10, 20]


def test_model_that_fits_nowhere_is_a_clear_error():
    nodes = [NodeSpec("master", 8 * GiB, True), NodeSpec("laptop", 4 * GiB)]
    with pytest.raises(PlacementError, match="does not fit.*need 80.00 GiB"):
        place(nodes, [GiB] * 80)


def test_master_extra_bytes_count_against_the_master():
    nodes = [NodeSpec("master", 10 * GiB, True), NodeSpec("w", 10 * GiB)]
    segs = place(nodes, [GiB] * 12, master_extra_bytes=4 * GiB)
    assert covers(segs, 12) and held(segs, "master") <= 6


def test_topology_file_fixed_and_auto_nodes(tmp_path):
    f = tmp_path / "topology.yml"
    f.write_text("gpu-box:\n  host: '10.0.0.2:10128'\n  description: RTX 3090\n"
                 "  layers:\n    - 'model.layers.0-11'\n"
                 "laptop:\n  host: '10.0.0.3:10128'\n  layers: []\n")
    topo = load_topology(f)
    assert [(n.name, n.layers) for n in topo] == [("gpu-box", (0, 12)), ("laptop", None)]
    nodes = [NodeSpec("master", 10 * GiB, True)] + [
        NodeSpec(n.name, 10 * GiB, layers=n.layers) for n in topo]
    segs = place(nodes, [GiB // 4] * 30)
    assert covers(segs, 30)
    assert segs[0].node == "gpu-box" and (segs[0].start, segs[0].end) == (0, 12)
    assert held(segs, "master") + held(segs, "laptop") == 18 and held(segs, "laptop") > 0
    assert "model.layers.0-11" in dump_topology(topo, segs)


def test_layer_specs():
    assert parse_layers(["model.layers.3-5"]) == (3, 6)
    assert parse_layers(["model.layers.3", "model.layers.4"]) == (3, 5)
    assert parse_layers([]) is None
    with pytest.raises(PlacementError, match="contiguous"):
        parse_layers(["model.layers.0-2", "model.layers.5"])
    with pytest.raises(PlacementError, match="past the model"):
        parse_layers(["model.layers.0-40"], num_layers=30)
    with pytest.raises(PlacementError, match="overlap"):
        place([NodeSpec("m", 99 * GiB, True), NodeSpec("a", 99 * GiB, layers=(0, 5)),
               NodeSpec("b", 99 * GiB, layers=(4, 8))], [1] * 10)
