"""Which node holds which decoder layers: a pure function of node memory and layer sizes.

Layers go out in contiguous ranges, in node order (the master first), so a token's hidden
state makes one trip around the ring master -> W1 -> ... -> Wn -> master. Each node's share is
proportional to its usable memory, capped by what fits. The master also holds the embeddings,
the final norm and the head, whose bytes come off its capacity first.

Cake's topology.yml (node name -> host, description, layers like 'model.layers.0-5') fixes
ranges by hand; nodes listed with no layers are placed automatically in what is left.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

GiB = 1 << 30


class PlacementError(ValueError):
    pass


@dataclass
class NodeSpec:
    name: str
    memory_bytes: int  # usable memory for weights (see usable_memory)
    is_master: bool = False
    layers: Optional[tuple[int, int]] = None  # fixed [start, end) from a topology file


@dataclass
class Segment:
    """Layers [start, end) on a node."""

    node: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def usable_memory(total_bytes: int, reserve_fraction: float = 0.1,
                  reserve_min: int = GiB // 2) -> int:
    """Memory left for weights once the KV cache, activations and the runtime have theirs."""
    return max(0, total_bytes - max(reserve_min, int(total_bytes * reserve_fraction)))


def _fits_from(pos: int, end: int, caps: list[int], layer_bytes: list[int]) -> bool:
    """Can layers [pos, end) be cut into consecutive ranges within caps, in order? Greedy
    filling is optimal for ordered contiguous packing."""
    for cap in caps:
        used = 0
        while pos < end and used + layer_bytes[pos] <= cap:
            used += layer_bytes[pos]
            pos += 1
    return pos >= end


def _shares(total: int, weights: list[int], limits: list[int]) -> list[int]:
    """Integer shares of total proportional to weights, none above its limit (water-filling,
    then largest remainders)."""
    shares = [0.0] * len(weights)
    free = [i for i, w in enumerate(weights) if limits[i] > 0]
    left = float(total)
    while free and left > 1e-9:
        w = sum(weights[i] for i in free) or 1
        over = [i for i in free if left * weights[i] / w > limits[i] - shares[i]]
        if not over:
            for i in free:
                shares[i] += left * weights[i] / w
            break
        for i in over:
            left -= limits[i] - shares[i]
            shares[i] = limits[i]
            free.remove(i)
    counts = [int(x) for x in shares]
    order = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in order[:max(0, total - sum(counts))]:
        counts[i] += 1
    return counts


def split_range(start: int, end: int, nodes: list[NodeSpec], layer_bytes: list[int],
                extra_bytes: Optional[dict[str, int]] = None) -> list[Segment]:
    """Cut layers [start, end) into one contiguous range per node, in node order, sized in
    proportion to memory and never beyond what a node holds. extra_bytes: what a node must
    hold besides layers (the master's embeddings and head)."""
    extra_bytes = extra_bytes or {}
    caps = [max(0, n.memory_bytes - extra_bytes.get(n.name, 0)) for n in nodes]
    need = sum(layer_bytes[start:end])
    if not _fits_from(start, end, caps, layer_bytes):
        have = sum(caps)
        raise PlacementError(
            f"the model does not fit: layers {start}-{end - 1} need {need / GiB:.2f} GiB, the "
            f"{len(nodes)} node(s) have {have / GiB:.2f} GiB usable "
            f"({', '.join(f'{n.name}: {c / GiB:.2f}' for n, c in zip(nodes, caps))}); "
            "add workers or use a smaller model or quantization")
    counts = _shares(end - start, [n.memory_bytes for n in nodes],
                     [c // max(1, need // max(1, end - start)) for c in caps])
    segments, pos = [], start
    for i, (node, cap) in enumerate(zip(nodes, caps)):
        if i == len(nodes) - 1:
            take_to = end
        else:
            # The proportional share, then moved as little as needed so that this node's
            # range fits it and what is left still fits the nodes after it.
            hi, used = pos, 0
            while hi < end and used + layer_bytes[hi] <= cap:
                used += layer_bytes[hi]
                hi += 1
            lo = pos
            while not _fits_from(lo, end, caps[i + 1:], layer_bytes):
                lo += 1
            take_to = min(max(pos + counts[i], lo), hi)
        segments.append(Segment(node.name, pos, take_to))
        pos = take_to
    return segments


def place(nodes: list[NodeSpec], layer_bytes: list[int], master_extra_bytes: int = 0
          ) -> list[Segment]:
    """Segments covering every layer, ordered by layer. nodes[0] is the master.

    Nodes with fixed layers keep them; the layers left over go to the master and the nodes
    without fixed layers, in proportion to memory."""
    num_layers = len(layer_bytes)
    master = nodes[0]
    if not master.is_master:
        raise PlacementError("the first node must be the master")
    fixed = sorted((n for n in nodes if n.layers is not None), key=lambda n: n.layers[0])
    taken = [False] * num_layers
    segments = []
    for n in fixed:
        s, e = n.layers
        if not (0 <= s < e <= num_layers):
            raise PlacementError(f"node {n.name}: layers {s}-{e - 1} are outside the model's "
                                 f"0-{num_layers - 1}")
        if any(taken[s:e]):
            raise PlacementError(f"node {n.name}: layers {s}-{e - 1} overlap another node's")
        taken[s:e] = [True] * (e - s)
        if sum(layer_bytes[s:e]) > n.memory_bytes:
            raise PlacementError(f"node {n.name} cannot hold layers {s}-{e - 1}")
        segments.append(Segment(n.name, s, e))
    free_runs, i = [], 0
    while i < num_layers:
        if taken[i]:
            i += 1
            continue
        j = i
        while j < num_layers and not taken[j]:
            j += 1
        free_runs.append((i, j))
        i = j
    auto = [n for n in nodes if n.layers is None]
    if free_runs:
        # The largest free run is split among the master and the automatic nodes; the master
        # fills any other gaps (it may hold several ranges; a worker holds one).
        main = max(free_runs, key=lambda r: sum(layer_bytes[r[0]:r[1]]))
        budget = master.memory_bytes - master_extra_bytes
        for s, e in free_runs:
            if (s, e) != main:
                segments += split_range(s, e, [NodeSpec(master.name, budget, True)], layer_bytes)
                budget -= sum(layer_bytes[s:e])
        auto[0] = NodeSpec(master.name, budget, True)
        segments += split_range(*main, auto, layer_bytes)
    return sorted((s for s in segments if s.size > 0), key=lambda s: s.start)


# --- Cake's topology.yml -------------------------------------------------------------------

@dataclass
class TopologyNode:
    name: str
    host: str = ""
    description: str = ""
    layers: Optional[tuple[int, int]] = None
    extra: dict = field(default_factory=dict)


def parse_layers(items, num_layers: Optional[int] = None) -> Optional[tuple[int, int]]:
    """['model.layers.0-5'] or ['model.layers.0', 'model.layers.1', ...] -> (0, 6); a node
    must hold one contiguous range."""
    if not items:
        return None
    if isinstance(items, str):
        items = [items]
    idx: list[int] = []
    for item in items:
        m = re.fullmatch(r"(?:model\.layers\.)?(\d+)(?:-(\d+))?", str(item).strip())
        if not m:
            raise PlacementError(f"cannot read layer range {item!r} (want 'model.layers.A-B')")
        a = int(m[1])
        b = int(m[2]) if m[2] else a
        if b < a:
            raise PlacementError(f"layer range {item!r} runs backwards")
        idx += range(a, b + 1)
    idx = sorted(set(idx))
    if idx != list(range(idx[0], idx[-1] + 1)):
        raise PlacementError(f"layers {items} are not one contiguous range")
    if num_layers is not None and idx[-1] >= num_layers:
        raise PlacementError(f"layer {idx[-1]} is past the model's last ({num_layers - 1})")
    return idx[0], idx[-1] + 1


def load_topology(path) -> list[TopologyNode]:
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise PlacementError(f"{path}: expected a mapping of node name -> settings")
    nodes = []
    for name, spec in doc.items():
        spec = spec or {}
        nodes.append(TopologyNode(str(name), str(spec.get("host", "")),
                                  str(spec.get("description", "")),
                                  parse_layers(spec.get("layers")), spec))
    return nodes


def format_layers(start: int, end: int) -> str:
    return f"model.layers.{start}-{end - 1}" if end > start else ""


def dump_topology(nodes: list[TopologyNode], segments: list[Segment]) -> str:
    import yaml

    ranges = {s.node: format_layers(s.start, s.end) for s in segments}
    doc = {n.name: {"host": n.host, "description": n.description,
                    "layers": [ranges[n.name]] if ranges.get(n.name) else []} for n in nodes}
    return yaml.safe_dump(doc, sort_keys=False)
