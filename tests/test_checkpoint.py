"""Every checkpoint format implements one Checkpoint protocol (cake.text.weights): names,
shapes and stored sizes from the headers, tensors dense or as GGML blocks, the files. Sizing
for placement and the topology document read nothing else."""
import math
from pathlib import Path

import pytest
import torch

from cake.cluster.stage import BundleCheckpoint, make_bundle
from cake.cluster.topology import TensorTable, packed_types, tensor_shapes
from cake.text.gguf_weights import GGUFCheckpoint
from cake.text.weights import Checkpoint, SafetensorsCheckpoint, layer_tensor_names
from conftest import default_gguf, write_tiny_model


def bundle_of(checkpoint, tmp_path: Path, name: str) -> BundleCheckpoint:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(make_bundle(checkpoint, layer_tensor_names(checkpoint, 0, 1)))
    return BundleCheckpoint(path, checkpoint.config)


def check_protocol(ckpt) -> dict:
    assert isinstance(ckpt, Checkpoint)
    info = ckpt.tensor_info()
    assert set(info) == set(ckpt.tensor_names())
    assert all(f.is_file() for f in ckpt.files())
    return info


def test_safetensors_folder_and_its_bundle(tmp_path):
    folder = write_tiny_model(tmp_path / "m", "llama", vocab_size=256)
    ckpt = SafetensorsCheckpoint(folder)
    info = check_protocol(ckpt)
    for name in ckpt.tensor_names():  # sizes from the header agree with the tensors read
        t = ckpt.get(name)
        assert info[name].shape == tuple(t.shape) and not info[name].blocks
        assert info[name].n_bytes == t.numel() * t.element_size()
        assert ckpt.raw(name) is None
    assert packed_types(ckpt, "auto") == {}
    bundle = bundle_of(ckpt, tmp_path, "st")
    layer0 = set(layer_tensor_names(ckpt, 0, 1))
    assert set(check_protocol(bundle)) == layer0
    assert {n: bundle.tensor_info()[n] for n in layer0} == {n: info[n] for n in layer0}
    assert torch.equal(bundle.get(sorted(layer0)[0]), ckpt.get(sorted(layer0)[0]))


def test_gguf_and_its_bundle(tmp_path):
    ckpt = GGUFCheckpoint(default_gguf())
    info = check_protocol(ckpt)
    q = info["model.layers.0.self_attn.q_proj.weight"]
    assert q.type == "Q4_1" and q.blocks and q.shape == (576, 576)
    assert q.n_bytes == math.prod(q.shape) // 32 * 20  # Q4_1: 20 bytes per 32 weights
    assert not info["model.norm.weight"].blocks
    assert tensor_shapes(ckpt)["model.embed_tokens.weight"] == (49152, 576)
    packed = packed_types(ckpt, "auto")
    assert packed["model.layers.0.self_attn.q_proj.weight"] == ("Q4_1", q.n_bytes)
    bundle = bundle_of(ckpt, tmp_path, "gguf")
    layer0 = layer_tensor_names(ckpt, 0, 1)
    got = check_protocol(bundle)
    assert {n: got[n] for n in layer0} == {n: info[n] for n in layer0}
    qtype, data, shape = bundle.raw("model.layers.0.self_attn.q_proj.weight")
    want = ckpt.raw("model.layers.0.self_attn.q_proj.weight")
    assert (qtype, shape) == (want[0], want[2]) and (data == want[1]).all()
    # What a server keeps for its topology answers as the checkpoint did.
    table = TensorTable(ckpt)
    assert tensor_shapes(table) == tensor_shapes(ckpt)
    assert packed_types(table, "auto") == packed


def test_vibevoice_language_model(tmp_path):
    pytest.importorskip("transformers")
    from cake.audio.vibevoice.cluster import LanguageModelCheckpoint
    from cake.testing.tiny_vibevoice import write_tiny

    folder = tmp_path / "vv"
    model = write_tiny(folder)
    ckpt = LanguageModelCheckpoint(folder, model.config.text_config.to_dict())
    info = check_protocol(ckpt)
    name = layer_tensor_names(ckpt, 0, 1)[0]
    t = ckpt.get(name)
    assert info[name].shape == tuple(t.shape)
    assert info[name].n_bytes == t.numel() * t.element_size()
