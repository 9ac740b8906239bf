"""Gemma 3 (text), Phi-3/Phi-4, OLMo 2, EXAONE 4 and SmolLM3 against transformers, on tiny
random models built here: logits over a prompt longer than every sliding window plus decode
steps, batched rows, a 2-stage split, the quantized kernel path, GGUFs written by llama.cpp's
own converter, both config forms, and a real `cake serve` of each."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import default_gguf  # noqa: E402
from gguf_convert import convert  # noqa: E402
from test_model_parity import (assert_batched_decode_equals_alone, generate,  # noqa: E402
                               new_cache, randomize, run_stages)

from cake.text import quant  # noqa: E402
from cake.text.gguf_weights import GGUFCheckpoint  # noqa: E402
from cake.text.loader import load_stage  # noqa: E402
from cake.text.models.args import ModelArgs  # noqa: E402
from cake.text.weights import SafetensorsCheckpoint  # noqa: E402

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=True)
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=8,
                short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[1.0, 1.5, 2.5, 4.0])
# family -> (config class, model class, fields beyond COMMON)
FAMILIES = {
    # 6 layers: five sliding (window 4, base 10000), then one global (base 1e6); llama.cpp's
    # Gemma 3 scales scores by head_dim^-1/2, so query_pre_attn_scalar = head_dim here.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, sliding_window=4, query_pre_attn_scalar=16,
        final_logit_softcapping=30.0)),
    # Phi-4-mini's kind: partial rotary, longrope (prompt past its original context of 8),
    # and a window over every layer.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_hidden_layers=2, partial_rotary_factor=0.5, rope_parameters=LONGROPE,
        original_max_position_embeddings=8, sliding_window=6, tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_hidden_layers=2)),
    # LLLG: three sliding layers with rope, then a global NoPE one.
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(
        sliding_window=4, sliding_window_pattern=4)),
    # Layer 3 has no rope.
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(tie_word_embeddings=False)),
}
PROMPT = [5, 901, 17, 3020, 44, 9, 610, 77, 12000, 31, 8, 2501, 64, 700, 19, 43000, 88, 6]
DECODE_STEPS = 8


def build(name: str, folder):
    """A tiny random model of the family, saved with the default model's real tokenizer."""
    cfg_name, model_name, fields = FAMILIES[name]
    return build_model(cfg_name, model_name, fields, folder,
                       GEMMA_TEMPLATE if name == "gemma3" else None)


def build_model(cfg_name: str, model_name: str, fields: dict, folder, template=None):
    """transformers' model of that class, random, saved in folder with the default model's
    tokenizer (and its chat template unless one is given)."""
    from cake.text.gguf_weights import GGUFCheckpoint

    config = getattr(transformers, cfg_name)(**{**COMMON, **fields})
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(config).eval()
    randomize(hf, seed=1)
    hf.save_pretrained(folder)
    gguf = GGUFCheckpoint(default_gguf())
    gguf.tokenizer().save(str(folder / "tokenizer.json"))
    sp = gguf.special_tokens()
    template = template or gguf.chat_template()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": sp["bos_token"],
        "eos_token": sp["eos_token"], "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return hf


# Gemma's template in short: no system role; a system message is put before the first user
# turn's text (as Gemma 3's own template does).
GEMMA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<|im_start|>' + role + '\n' + (first if loop.first else '') + m['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (transformers model, checkpoint folder), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(name) / name
            built[name] = build(name, folder), folder
        return built[name]

    return get


def transformers_logits(hf, tokens) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(models, name):
    hf, folder = models(name)
    model = load_stage(SafetensorsCheckpoint(folder))
    tokens, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    theirs = transformers_logits(hf, tokens)
    assert theirs.std() > 1, "logits too small for the comparison to mean anything"
    assert ours.shape == theirs.shape == (len(PROMPT) + DECODE_STEPS, COMMON["vocab_size"])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def legacy(cfg: dict) -> dict:
    """config.json the way older transformers wrote these families: rope_theta and
    rope_scaling (Gemma: rope_local_base_freq), sliding_window_pattern, no layer_types."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    if "full_attention" in rope:  # Gemma 3
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    rope = dict(rope)
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    if cfg.pop("layer_types", None) and cfg["model_type"] == "exaone4":
        cfg["sliding_window_pattern"] = "LLLG"
    if cfg["model_type"] == "gemma3_text":
        cfg["sliding_window_pattern"] = 6
    return cfg


@pytest.mark.parametrize("name", FAMILIES)
def test_both_config_forms(models, name):
    _, folder = models(name)
    cfg = json.loads((folder / "config.json").read_text())
    new, old = ModelArgs.from_config(cfg), ModelArgs.from_config(legacy(cfg))
    assert new == old
    expected = {
        "gemma3": lambda a: ([a.window(i) for i in range(6)] == [4] * 5 + [None]
                             and a.rope_local["rope_theta"] == 10000.0
                             and a.rope_theta == 1e6 and a.norms == "sandwich"),
        "phi3": lambda a: (a.partial_rotary_factor == 0.5 and a.fused_checkpoint
                           and a.rope_scaling["rope_type"] == "longrope"
                           and a.rope_scaling["original_max_position_embeddings"] == 8),
        "olmo2": lambda a: a.qk_norm == "proj" and a.norms == "post",
        "exaone4": lambda a: ([a.window(i) for i in range(4)] == [4, 4, 4, None]
                              and [a.has_rope(i) for i in range(4)] == [True] * 3 + [False]),
        "smollm3": lambda a: [a.has_rope(i) for i in range(4)] == [True] * 3 + [False],
    }[name]
    assert expected(new)


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_decode_equals_single(models, name):
    model = load_stage(SafetensorsCheckpoint(models(name)[1]))
    assert_batched_decode_equals_alone(model, [PROMPT[:7], PROMPT[2:]], [2, 0], 4, atol=1e-4,
                                       greedy=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_two_stages_equal_one(models, name):
    assert_two_stages_equal_one(SafetensorsCheckpoint(models(name)[1]))


def assert_two_stages_equal_one(ck) -> None:
    """The model's layers split in two stages give the tokens and logits of one stage."""
    n = ck.config["num_hidden_layers"]
    whole = load_stage(ck)
    stages = [load_stage(ck, 0, n // 2), load_stage(ck, n // 2, n)]
    tokens, expected = generate([whole], [new_cache(whole)], PROMPT, DECODE_STEPS)
    tokens_staged, got = generate(stages, [new_cache(s) for s in stages], PROMPT, DECODE_STEPS)
    assert tokens_staged == tokens
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def kernels_or_skip():
    if not quant.available():
        import os
        if os.environ.get("CI") == "true":
            pytest.fail("the CPU kernels did not build")
        pytest.skip("no CPU kernels here")


@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_decode_on_kernels(models, name):
    """Q8_0 weights: decoding token by token (our kernels) gives the logits that one prefill
    of the whole sequence (PyTorch attention over the same quantized matrices) gives."""
    kernels_or_skip()
    model = load_stage(SafetensorsCheckpoint(models(name)[1]), quant_mode="q8_0")
    for layer in model.model.layers.values():
        mats = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                layer.mlp.down_proj]
        assert all(isinstance(m, quant.QuantLinear) for m in mats)
    # Every family's blocks run as one kernel call per layer.
    assert all(layer.kernel_args is not None for layer in model.model.layers.values())
    tokens, stepped = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    whole = run_stages([model], [new_cache(model)], [tokens], [list(range(len(tokens)))], [0])[0]
    assert whole.abs().max() > 1
    assert (stepped - whole).abs().max() <= 1e-3 * whole.abs().max()


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    """(name, outtype) -> a GGUF written by llama.cpp's convert_hf_to_gguf.py."""
    made = {}

    def get(name, outtype="f32"):
        if (name, outtype) not in made:
            _, folder = models(name)
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{outtype}.gguf"
            made[name, outtype] = convert(folder, out, outtype)
        return made[name, outtype]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf_matches_transformers(models, ggufs, name):
    hf, _ = models(name)
    ck = GGUFCheckpoint(ggufs(name))
    assert ck.arch == name
    model = load_stage(ck)
    tokens, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    torch.testing.assert_close(ours, transformers_logits(hf, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf_q8_0_keeps_blocks(models, ggufs, name):
    """A Q8_0 GGUF stays Q8_0 in memory and computes what the same weights quantized from
    safetensors compute."""
    kernels_or_skip()
    _, folder = models(name)
    model = load_stage(GGUFCheckpoint(ggufs(name, "q8_0")), quant_mode="auto")
    assert {t for t, _ in model.quantized.values()} == {"Q8_0"}
    assert any(".layers.0.self_attn." in n for n in model.quantized)
    ref = load_stage(SafetensorsCheckpoint(folder), quant_mode="q8_0")
    _, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    _, theirs = generate([ref], [new_cache(ref)], PROMPT, DECODE_STEPS)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, EOS included (generate() would mask it)."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(hf(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == COMMON["eos_token_id"]:
                break
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_serve_answers_like_transformers(models, start_server, name):
    hf, folder = models(name)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = greedy(hf, ids, 12)
    server = start_server(str(folder), "--temperature", "0", "--max-batch", "2",
                          "--ctx-size", "256")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=12)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)

    # /health and the topology count the KV block pool (float16 keys and values on CPU;
    # --max-batch 2 of 256 positions, twice over: 64 blocks of 16), and nothing held once
    # the request is done.
    args = ModelArgs.from_config(hf.config.to_dict())
    row = 2 * args.num_key_value_heads * args.head_dim * 2
    engine = httpx.get(server.url + "/health", timeout=10).json()["engine"]
    assert (engine["kv_blocks_total"], engine["kv_block_size"]) == (64, 16)
    capacity = 64 * 16 * row * args.num_hidden_layers
    assert engine["kv_cache_capacity_bytes"] == capacity and engine["kv_cache_bytes"] == 0
    topology = httpx.get(server.url + "/api/v1/topology", timeout=10).json()
    assert topology["master"]["kv_cache_capacity_bytes"] == capacity
    assert topology["master"]["layer_range"] == f"model.layers.0-{args.num_hidden_layers - 1}"
    assert len(topology["layer_details"]) == args.num_hidden_layers


@pytest.mark.parametrize("name", ["gemma3", "exaone4"])
def test_sliding_layers_keep_only_their_window(models, name):
    """Past a long prompt, a sliding layer's cache has given back the positions behind its
    window (they read as zeros), a global layer keeps all, and logits still match."""
    hf, folder = models(name)
    model = load_stage(SafetensorsCheckpoint(folder))
    cache = new_cache(model, max_len=512)
    prompt = [(7 * i + 3) % 40000 for i in range(300)]
    tokens, ours = generate([model], [cache], prompt, 2)
    torch.testing.assert_close(ours, transformers_logits(hf, tokens), atol=1e-4, rtol=0)
    for i in range(model.args.num_hidden_layers):
        old = cache.k[i][0, :200]
        if model.args.window(i):
            assert not old.any() and cache.k[i][0, len(tokens) - 4:len(tokens)].any()
        else:
            assert old.abs().sum(-1).all()


ROPES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128),
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=128,
                        mscale=0.707, mscale_all_dim=1.0, beta_fast=16, beta_slow=2),
    "longrope": dict(rope_type="longrope", original_max_position_embeddings=64,
                     short_factor=[1.0 + i / 10 for i in range(8)],
                     long_factor=[1.0 + i / 2 for i in range(8)]),
}


@pytest.mark.parametrize("kind", ROPES)
def test_rope_variants_match_transformers(kind):
    """Frequencies and attention factor of each rope variant, as transformers computes them
    (longrope: the long factors, for a context past the original)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from cake.text.models.rope import rope_frequencies

    rope = {"rope_theta": 50000.0, **ROPES[kind]}
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                      max_position_embeddings=1024, rope_parameters=rope)
    seq = 1024 if kind == "longrope" else None
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu", seq_len=seq)
    got, factor = rope_frequencies(16, 50000.0, ROPES[kind], 1024)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-6)


def test_gemma3_over_a_cluster(models, start_server, tmp_path_factory):
    """Gemma 3's sliding and global layers split between the master and a worker process:
    the same greedy text as one machine, and the worker's layers and KV block pool in the
    topology."""
    pytest.importorskip("ray")
    from cluster_procs import start_cluster

    hf, folder = models("gemma3")
    tmp = tmp_path_factory.mktemp("gemma3-cluster")
    topo = tmp / "topology.yml"
    topo.write_text("w1:\n  host: '127.0.0.1'\n  layers:\n    - 'model.layers.3-5'\n")
    opts = ["--max-batch", "2", "--ctx-size", "256"]
    single = start_server(str(folder), "--temperature", "0", *opts)
    master, workers, _ = start_cluster(start_server, tmp,
                                       [str(folder), "--topology", str(topo), *opts],
                                       [(["worker", "--name", "w1"], {})])
    try:
        ask = dict(model="x", messages=[{"role": "user", "content": "Tell me a story."}],
                   max_tokens=20, temperature=0)
        texts = [openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
                 .chat.completions.create(**ask).choices[0].message.content
                 for s in (single, master)]
        assert texts[0] == texts[1]
        doc = httpx.get(master.url + "/api/v1/topology", timeout=30).json()
        assert doc["master"]["layer_range"] == "model.layers.0-2"
        w1 = doc["workers"][0]
        assert w1["layer_range"] == "model.layers.3-5"
        args = ModelArgs.from_config(hf.config.to_dict())
        row = 2 * args.num_key_value_heads * args.head_dim * 2
        # A pool of 16-position blocks for its 3 layers: --max-batch 2 of 256 positions,
        # twice over (64 blocks), as on one machine.
        assert w1["kv_cache_capacity_bytes"] == 64 * 16 * row * 3
    finally:
        for w in workers:
            w.stop()
        master.stop()
