"""Our CPU kernels against references: each quantized product against the dequantized weights
(gguf's own dequantizer), decode attention against PyTorch attention, whole quantized models
against the same model with dequantized weights, and the default model's answer.

Tolerance of a product: activations are quantized per block of 32 to int16, so each value is
off by at most amax(block) / 65534; an output is off by at most sum_k |w_k - o_k| * that, o_k
being the weight's offset (Q4_1/Q5_1's m, the K-quants' min), which the kernels multiply by the
block's exact sum; plus fp32 rounding, at most 1e-5 * sum_k |w_k x_k| here. Models: logits
within 1e-3 of their largest magnitude.
"""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from cake.text import kernels, quant
from cake.text.kv_cache import KVCache, StepBatch
from cake.text.loader import load_stage
from cake.text.models.llama import rotate_half
from cake.text.weights import SafetensorsCheckpoint

pytestmark = pytest.mark.skipif(kernels.ops() is None, reason=f"no kernels: {kernels.error()}")
transformers = pytest.importorskip("transformers")

QTYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
KERNEL_TYPES = QTYPES + [Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# The gguf package quantizes none of the K-quants: their blocks are random bytes, with sane
# fp16 scales at these offsets (every bit pattern of the rest is a valid block).
HALF_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# Where a block's integers are, for types with an offset term: zeroed, the block dequantizes
# to its offsets.
INTEGER_BYTES = {Q.Q4_1: slice(4, 20), Q.Q5_1: slice(4, 24), Q.Q4_K: slice(16, 144),
                 Q.Q5_K: slice(16, 176)}
SHAPES = {32: [(100, 64), (192, 576), (8, 1536)], 256: [(100, 256), (40, 768), (8, 2048)]}


def gguf_blocks(qtype, rows: int, cols: int, seed: int) -> np.ndarray:
    """[rows, bytes] of GGUF blocks holding a [rows, cols] matrix of type qtype."""
    rng = np.random.default_rng(seed)
    if qtype not in HALF_FIELDS:
        return quantize(rng.standard_normal((rows, cols), dtype=np.float32), qtype)
    size, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // size, nbytes), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        half = (rng.standard_normal((rows, cols // size, 1)) * 0.01).astype(np.float16)
        blocks[..., at:at + 2] = half.view(np.uint8)
    return blocks.reshape(rows, -1)


def offsets(blocks: np.ndarray, qtype, rows: int, cols: int) -> torch.Tensor:
    if qtype not in INTEGER_BYTES:
        return torch.zeros(rows, cols, dtype=torch.float64)
    size, nbytes = GGML_QUANT_SIZES[qtype]
    zeroed = blocks.reshape(rows, -1, nbytes).copy()
    zeroed[..., INTEGER_BYTES[qtype]] = 0
    return torch.from_numpy(dequantize(zeroed.reshape(rows, -1), qtype).reshape(rows, cols)).double()


def product_bound(x: torch.Tensor, w: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Largest error int16 activations and fp32 sums can cause in x @ w.T, per output."""
    amax = x.abs().view(*x.shape[:-1], -1, 32).amax(-1, keepdim=True)
    step = (amax / 65534).expand(*x.shape[:-1], -1, 32).reshape(x.shape)
    return step @ (w - offset).abs().T + 1e-5 * (x.abs() @ w.abs().T)


@contextlib.contextmanager
def dense_rows(rows: int):
    """Products of `rows` rows or more through bfloat16 GEMM (0: never), for the block."""
    before = torch.ops.cake.set_dense_rows(rows)
    try:
        yield
    finally:
        torch.ops.cake.set_dense_rows(before)


def check_product(qtype, rows: int, cols: int, seed: int = 0) -> None:
    """One matrix of `qtype` through repack, dequantize and products of several row counts,
    against the gguf package's dequantized weights in float64: the int16 kernels within
    product_bound, the bfloat16 path (inputs and outputs rounded to 8-bit mantissas, 2^-9
    relative each, fp32 sums) within 2^-7 * sum_k |w_k x_k|."""
    g = torch.Generator().manual_seed(seed)
    blocks = gguf_blocks(qtype, rows, cols, seed)
    reference = torch.from_numpy(dequantize(blocks, qtype).reshape(rows, cols)).float()
    layer = quant.QuantLinear(blocks, qtype, cols)
    assert torch.equal(layer.dequantize(), reference)  # repacking lost nothing
    w, offset = reference.double(), offsets(blocks, qtype, rows, cols)
    for m in (1, 3, 4, 9, 70):  # row tiles of 8 and 4, tails of 1-3, several cache panels
        x = torch.randn(m, cols, generator=g) * torch.rand(m, cols, generator=g) * 3
        want = x.double() @ w.T
        with dense_rows(0):
            err = (layer(x).double() - want).abs()
        assert (err <= product_bound(x.double(), w, offset)).all(), (qtype.name, m, err.max())
        with dense_rows(1):
            err = (layer(x).double() - want).abs()
        assert (err <= 2 ** -7 * (x.double().abs() @ w.abs().T)).all(), (qtype.name, m, err.max())


def test_prompts_of_wide_models_take_the_bfloat16_gemm_where_the_cpu_has_amx(monkeypatch):
    """A 1B-class model's prompts go through the bfloat16 GEMM (within check_product's bound)
    on an AMX CPU; the default model's (hidden 576) stay on the int16 kernels; CAKE_DENSE_ROWS
    overrides."""
    monkeypatch.delenv("CAKE_DENSE_ROWS", raising=False)
    before = torch.ops.cake.set_dense_rows(0)
    try:
        assert kernels.dense_prompts_for(576) == 0
        assert torch.ops.cake.set_dense_rows(0) == 0
        wide = kernels.dense_prompts_for(2048)
        assert wide == (kernels.DENSE_PROMPT_ROWS if kernels.has_amx() else 0)
        assert torch.ops.cake.set_dense_rows(0) == wide
        monkeypatch.setenv("CAKE_DENSE_ROWS", "7")
        assert kernels.dense_prompts_for(2048) == 7
    finally:
        torch.ops.cake.set_dense_rows(before)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", range(3))
def test_product_matches_dequantized_weights(qtype, shape):
    rows, cols = SHAPES[GGML_QUANT_SIZES[qtype][0]][shape]
    check_product(qtype, rows, cols, seed=rows + cols)


def test_bias_fusion_and_embedding_rows():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(n, 64, generator=g) for n in (64, 32, 32)]
    bias = torch.randn(32, generator=g)
    layers = [quant.QuantLinear.from_weight(w, Q.Q8_0, bias=bias if i == 2 else None)
              for i, w in enumerate(ws)]
    fused = quant.fuse_linears(layers)
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in layers], -1), rtol=0, atol=0)
    emb = quant.QuantEmbedding(quantize(ws[0].numpy(), Q.Q4_1), Q.Q4_1, 64)
    ids = torch.tensor([[3, 0, 63]])
    want = dequantize(quantize(ws[0].numpy(), Q.Q4_1), Q.Q4_1).reshape(64, 64)[[3, 0, 63]]
    assert torch.equal(emb(ids)[0], torch.from_numpy(want))
    with pytest.raises(RuntimeError, match="out of range"):
        emb(torch.tensor([64]))


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_matches_sdpa(window, dtype):
    """Keys and values as the cache holds them (float16 caches round them once)."""
    g = torch.Generator().manual_seed(window)
    H, Hkv, D, slots, cap = 6, 2, 32, 4, 40
    kc, vc = torch.randn(2, slots, cap, Hkv, D, generator=g).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    rows_slots, positions = torch.tensor([2, 0, 3]), torch.tensor([9, 0, 20])
    qkv = torch.randn(3, (H + 2 * Hkv) * D, generator=g)
    k_ref, v_ref = kc.clone(), vc.clone()
    out = torch.ops.cake.decode_attention(qkv, kc, vc, rows_slots, positions, inv_freq, H, window)
    for b, (s, p) in enumerate(zip(rows_slots.tolist(), positions.tolist())):
        q, k, v = qkv[b].split([H * D, Hkv * D, Hkv * D])
        ang = p * inv_freq
        cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()
        q = q.view(H, D) * cos + rotate_half(q.view(H, D)) * sin
        k_ref[s, p] = k.view(Hkv, D) * cos + rotate_half(k.view(Hkv, D)) * sin
        v_ref[s, p] = v.view(Hkv, D)
        lo = max(0, p + 1 - window) if window else 0
        keys = k_ref[s, lo:p + 1].float().repeat_interleave(H // Hkv, 1).transpose(0, 1)
        vals = v_ref[s, lo:p + 1].float().repeat_interleave(H // Hkv, 1).transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q[:, None], keys, vals)
        torch.testing.assert_close(out[b], want.reshape(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, k_ref, atol=1e-6, rtol=0)  # new keys rotated into the cache
    assert torch.equal(vc, v_ref)
    assert kc.dtype == vc.dtype == dtype


class Requantized:
    """A checkpoint whose matrices are what `qtype` blocks decode to: the exact reference of a
    model loaded from the original with quant_mode=qtype."""

    def __init__(self, checkpoint, qtype):
        self.inner, self.qtype, self.config = checkpoint, qtype, checkpoint.config

    def tensor_names(self):
        return self.inner.tensor_names()

    def tensor_info(self):
        return self.inner.tensor_info()

    def raw(self, name):
        return None

    def files(self):
        return []  # computed weights: no file holds them

    def get(self, name):
        t = self.inner.get(name).float()
        if t.ndim != 2:
            return t
        return torch.from_numpy(dequantize(quantize(t.numpy(), self.qtype), self.qtype)
                                .reshape(t.shape).copy())


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),  # q/k/v biases
    "qwen3": ("Qwen3Config", dict(head_dim=32, attention_bias=False)),  # q/k norms
    "mistral": ("MistralConfig", dict(sliding_window=4)),
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    def build(family):
        cls_name, fields = FAMILIES[family]
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(
            getattr(transformers, cls_name)(**TINY, **fields), dtype=torch.float32)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                p.copy_(1 + 0.2 * torch.randn(p.shape) if "norm" in name
                        else 0.15 * torch.randn(p.shape))
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        return SafetensorsCheckpoint(folder)
    return build


def greedy_logits(model, prompt, steps, slots=2, cache_dtype=torch.float32):
    """Prefill, then decode one token per step, in slot 1: logits of every step [steps+1, V]."""
    a = model.args
    cache = KVCache(range(a.num_hidden_layers), slots, 64, a.num_key_value_heads, a.head_dim,
                    cache_dtype, "cpu")
    tokens, out = list(prompt), []
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]), StepBatch.make([list(range(len(tokens)))], [1],
                                                              "cpu"), cache)[:, -1]
        for _ in range(steps):
            out.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]),
                           StepBatch.make([[len(tokens) - 1]], [1], "cpu"), cache)[:, -1]
        out.append(logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("qtype", ["q8_0", "q4_1"])
def test_quantized_model_matches_dequantized_reference(tiny_checkpoint, family, qtype):
    ck = tiny_checkpoint(family)
    model = load_stage(ck, quant_mode=qtype)
    layer = next(iter(model.model.layers.values()))
    assert layer.kernel_args is not None  # decoding takes the one-call layer kernel
    reference = load_stage(Requantized(ck, quant.QTYPES[qtype]))
    prompt = [3, 17, 99, 42, 7, 64, 5, 120]
    got, want = greedy_logits(model, prompt, 6), greedy_logits(reference, prompt, 6)
    assert want.abs().max() > 1
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_layer_kernel_takes_matrices_of_mixed_types(tiny_checkpoint):
    """q/k/v and gate/up of different types (llama.cpp's K-quant mixes give v and down a type
    of their own) stay separate matrices, and the one-call layer kernel computes what the
    layer composed op by op from the same matrices computes."""
    model = load_stage(tiny_checkpoint("qwen2"), quant_mode="q4_1")  # q/k/v biases
    types = [Q.Q4_1, Q.Q4_0, Q.Q8_0]
    for layer in model.model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        sizes = [attn.n_heads * attn.head_dim] + [attn.n_kv * attn.head_dim] * 2
        parts = zip(attn.qkv_proj.dequantize().split(sizes), attn.qkv_proj.bias.split(sizes))
        attn.q_proj, attn.k_proj, attn.v_proj = [
            quant.QuantLinear.from_weight(w, t, b) for (w, b), t in zip(parts, types)]
        gate, up = mlp.gate_up_proj.dequantize().chunk(2)
        mlp.gate_proj, mlp.up_proj = [quant.QuantLinear.from_weight(w, t)
                                      for w, t in zip((gate, up), types[1:])]
        attn.qkv_proj = mlp.gate_up_proj = None
        layer.prepare_kernel()
        assert [len(a) for a in layer.kernel_args if isinstance(a, list)] == [3, 3, 2, 2]
    prompt = [3, 17, 99, 42, 7, 64, 5, 120]
    fused = greedy_logits(model, prompt, 6)
    for layer in model.model.layers.values():
        layer.kernel_args = None
    composed = greedy_logits(model, prompt, 6)
    assert composed.abs().max() > 1
    assert (fused - composed).abs().max() <= 1e-3 * composed.abs().max()


def test_float16_cache_stays_close_to_float32(tiny_checkpoint):
    """What a CPU server stores (serving_dtype): logits within 1e-2 of a float32 cache's."""
    from cake.text.kv_cache import serving_dtype

    assert serving_dtype(torch.float32, "cpu") == torch.float16
    model = load_stage(tiny_checkpoint("llama"), quant_mode="q8_0")
    prompt = [3, 17, 99, 42, 7, 64, 5, 120]
    want = greedy_logits(model, prompt, 6)
    got = greedy_logits(model, prompt, 6, cache_dtype=torch.float16)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_batched_decode_equals_each_row_alone(tiny_checkpoint):
    """The kernels treat rows independently: a row's logits do not depend on its batch."""
    model = load_stage(tiny_checkpoint("llama"), quant_mode="q4_1")
    a = model.args
    cache = KVCache(range(2), 3, 64, a.num_key_value_heads, a.head_dim, torch.float32, "cpu")
    prompts = [[5, 9, 13], [7, 7, 7, 7, 100], [1]]
    with torch.inference_mode():
        for slot, p in enumerate(prompts):
            model(torch.tensor([p]), StepBatch.make([list(range(len(p)))], [slot], "cpu"), cache)
        batch = StepBatch.make([[len(p)] for p in prompts], [0, 1, 2], "cpu")
        together = model(torch.tensor([[11], [12], [13]]), batch, cache,
                         torch.zeros(3, dtype=torch.long))
        for slot, p in enumerate(prompts):
            alone = model(torch.tensor([[11 + slot]]), StepBatch.make([[len(p)]], [slot], "cpu"),
                          cache, torch.zeros(1, dtype=torch.long))
            assert torch.equal(alone[0], together[slot])


def test_default_model_answers_paris_quantized(default_tokenizer):
    from tests.conftest import default_gguf

    from cake.text.gguf_weights import GGUFCheckpoint

    ck = GGUFCheckpoint(default_gguf())
    model = load_stage(ck, quant_mode="auto")
    assert isinstance(model.model.embed_tokens, quant.QuantEmbedding)
    ids = default_tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    logits = greedy_logits(model, ids, 8, slots=2)
    text = default_tokenizer.decode([int(t) for t in logits.argmax(-1)])
    assert text.startswith("The capital of France is Paris."), text
    # Against the dequantized weights (transformers' answer, test_gguf): the first token's
    # top-2 gap is 0.08, so the logits must agree much closer than that.
    dense = greedy_logits(load_stage(ck), ids, 0)
    assert (logits[0] - dense[0]).abs().max() < 0.03
    # Every prompt row through the bfloat16 GEMM (CAKE_DENSE_ROWS, off by default): the same
    # answer, but the first token's logits move ~20x more (0.68 measured).
    with dense_rows(1):
        bf16 = greedy_logits(model, ids, 8, slots=2)
    assert default_tokenizer.decode([int(t) for t in bf16.argmax(-1)]) == text
    assert (bf16[0] - dense[0]).abs().max() < 1.0


def test_repacked_weights_come_back_from_the_disk_cache(tmp_path, monkeypatch):
    """A second load maps the first one's repacked weights (repack_cache): same layers, same
    logits, q/k/v and gate/up fused as views of the mapped file, no copy."""
    from tests.conftest import default_gguf

    from cake.text.gguf_weights import GGUFCheckpoint

    monkeypatch.setenv("CAKE_KERNEL_CACHE", str(tmp_path))
    ck = GGUFCheckpoint(default_gguf())
    first = load_stage(ck, 0, 3, quant_mode="auto")
    assert len(list(tmp_path.glob("repacked/*.bin"))) == 1
    again = load_stage(ck, 0, 3, quant_mode="auto")
    assert again.quantized == first.quantized
    layer = again.model.layers["1"]
    mapped = layer.self_attn.qkv_proj.packed.untyped_storage().data_ptr()
    assert layer.mlp.gate_up_proj.packed.untyped_storage().data_ptr() == mapped
    prompt = [1, 504, 3458, 282, 4649, 314]
    assert torch.equal(greedy_logits(again, prompt, 3), greedy_logits(first, prompt, 3))


def test_kernels_build_from_the_project_files(tmp_path):
    """A fresh cache compiles the library from cake/text/kernels and loads it, here for an
    AVX2-only CPU (CAKE_KERNEL_MARCH=haswell: no AVX-512, no VNNI), whose products must pass
    the same checks; no kernels (CAKE_NO_KERNELS) means torch's int4/int8 weights."""
    code = ("from cake.text import kernels, loader; import sys; "
            "print(kernels.ops() is not None, kernels.library_path().parent.parent == "
            "kernels.cache_dir(), loader.resolve_quant('auto', 'cpu'))")
    check = ("import torch; from tests.test_quant import *; print(torch.ops.cake.isa()); "
             "[check_product(q, *SHAPES[GGML_QUANT_SIZES[q][0]][1]) for q in KERNEL_TYPES]")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "CAKE_KERNEL_CACHE": str(tmp_path), "CAKE_KERNEL_MARCH": "haswell",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.stdout.split() == ["True", "True", "auto"], out.stderr
    assert list(tmp_path.glob("cake-kernels/*/cake_kernels.so"))
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.split() == ["avx2"], out.stdout + out.stderr
    env["CAKE_NO_KERNELS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.stdout.split() == ["False", "True", "auto"], out.stderr  # torch int4/int8 then
