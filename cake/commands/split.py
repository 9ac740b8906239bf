"""`cake split --model-path DIR --topology FILE --output DIR`: write each worker's layers as
a bundle it can start from without the master shipping them.

OUTPUT/<node>/stages/<model hash>/<start>-<end>.safetensors (+ .sha256) is the layout of a
worker's stage cache: copy OUTPUT/<node> to the worker as ~/.cache/cake (or point CAKE_CACHE
at it) and it loads those layers from disk, checksum verified.
"""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("split", help="write per-worker layer bundles from a topology file")
    p.add_argument("--model-path", required=True, help="model folder, .gguf file or repo id")
    p.add_argument("--topology", required=True, help="Cake's topology.yml")
    p.add_argument("--output", required=True, help="folder for the bundles")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from cake import hub
    from cake.cluster.placement import format_layers, load_topology
    from cake.cluster.ray_cluster import model_fingerprint
    from cake.cluster.stage import checksum, make_bundle
    from cake.text.weights import layer_tensor_names
    from cake.text.weights import open_checkpoint

    checkpoint = open_checkpoint(hub.resolve(args.model_path).path)
    model_hash = model_fingerprint(checkpoint)
    num_layers = checkpoint.config["num_hidden_layers"]
    out = Path(args.output)
    for node in load_topology(args.topology):
        if node.layers is None:
            print(f"{node.name}: no fixed layers (placed at start-up), skipped")
            continue
        start, end = node.layers
        if end > num_layers:
            raise SystemExit(f"cake: {node.name}: layers past the model's {num_layers}")
        bundle = make_bundle(checkpoint, layer_tensor_names(checkpoint, start, end))
        path = out / node.name / "stages" / model_hash / f"{start}-{end}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bundle)
        path.with_suffix(".sha256").write_text(checksum(bundle))
        (out / node.name / "node.json").write_text(json.dumps(
            {"node": node.name, "host": node.host, "layers": format_layers(start, end),
             "model_hash": model_hash}, indent=1))
        print(f"{node.name}: {format_layers(start, end)} -> {path} ({len(bundle) / 1e6:.1f} MB)")
    return 0
