"""Qwen3-MoE, Qwen3.5 (Gated DeltaNet hybrid) and Qwen3.5-MoE against transformers, on tiny
random models built here: logits over a prompt and decode steps, batched rows, a 2-stage
split, GGUFs written by llama.cpp's own converter, and a real `cake serve` of each."""
from __future__ import annotations

import json
import mmap
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gguf_convert import convert  # noqa: E402
from test_families import (COMMON, DECODE_STEPS, PROMPT, build_model, greedy,  # noqa: E402
                           assert_two_stages_equal_one, kernels_or_skip, transformers_logits)
from test_model_parity import assert_batched_decode_equals_alone, generate, new_cache  # noqa: E402

from cake.text import quant  # noqa: E402
from cake.text.gguf_weights import GGUFCheckpoint  # noqa: E402
from cake.text.loader import load_stage  # noqa: E402
from cake.text.weights import SafetensorsCheckpoint  # noqa: E402

MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
# Gated DeltaNet layers with 2 q/k heads serving 4 v heads, and one full-attention layer.
LINEAR = dict(linear_conv_kernel_dim=4, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=16, linear_value_head_dim=8,
              layer_types=["linear_attention", "linear_attention", "full_attention",
                           "linear_attention"])
# name -> (config class, model class, fields beyond COMMON)
MODELS = {
    # llama.cpp's qwen3moe always renormalizes the top-k weights, as Qwen3-30B-A3B says.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        **MOE, norm_topk_prob=True, tie_word_embeddings=False)),
    # Layer 1 keeps a dense MLP (mlp_only_layers; llama.cpp has no such qwen3moe).
    "qwen3_moe-mixed": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        **MOE, norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1)),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", LINEAR),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        **LINEAR, **MOE, shared_expert_intermediate_size=48, tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(name) / name
            built[name] = build_model(*MODELS[name], folder), folder
        return built[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(models, name):
    hf, folder = models(name)
    model = load_stage(SafetensorsCheckpoint(folder))
    tokens, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    theirs = transformers_logits(hf, tokens)
    assert theirs.std() > 1, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_batched_decode_equals_single(models, name):
    model = load_stage(SafetensorsCheckpoint(models(name)[1]))
    assert_batched_decode_equals_alone(model, [PROMPT[:7], PROMPT[2:]], [2, 0], 4, atol=1e-4,
                                       greedy=False)


@pytest.mark.parametrize("name", MODELS)
def test_two_stages_equal_one(models, name):
    assert_two_stages_equal_one(SafetensorsCheckpoint(models(name)[1]))


def test_fused_expert_checkpoint(models, tmp_path):
    """Experts stored fused ([E, 2F, D] gate_up_proj, [E, D, F] down_proj, as transformers 5
    holds them) load as the per-expert form does."""
    from safetensors.torch import save_file

    hf, folder = models("qwen3_moe")
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (fused / f).write_bytes((folder / f).read_bytes())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              str(fused / "model.safetensors"))
    ck = SafetensorsCheckpoint(fused)
    assert "model.layers.0.mlp.experts.gate_up_proj" in ck.tensor_names()
    model = load_stage(ck)
    tokens, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    torch.testing.assert_close(ours, transformers_logits(hf, tokens), atol=1e-4, rtol=0)


GGUF_ARCHS = {"qwen3_moe": "qwen3moe", "qwen3_5": "qwen35", "qwen3_5_moe": "qwen35moe"}


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    made = {}

    def get(name, outtype="f32"):
        if (name, outtype) not in made:
            tmp = tmp_path_factory.mktemp("gguf")
            folder, extra = models(name)[1], []
            if name.startswith("qwen3_5"):
                # transformers gives Qwen3.5 model types its own tokenizer class, whose
                # pre-tokenizer llama.cpp does not know with this (SmolLM2's) vocabulary:
                # the converter reads the tokenizer through another model type.
                folder = Path(shutil.copytree(folder, tmp / name))
                cfg = json.loads((folder / "config.json").read_text())
                (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3"}))
                extra = ["--no-mtp"]  # these tiny models have no multi-token-prediction head
            out = tmp / f"{name}-{outtype}.gguf"
            made[name, outtype] = convert(folder, out, outtype, *extra)
        return made[name, outtype]

    return get


@pytest.mark.parametrize("name", GGUF_ARCHS)
def test_gguf_matches_transformers(models, ggufs, name):
    hf, _ = models(name)
    ck = GGUFCheckpoint(ggufs(name))
    assert ck.arch == GGUF_ARCHS[name]
    model = load_stage(ck)
    tokens, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    torch.testing.assert_close(ours, transformers_logits(hf, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", GGUF_ARCHS)
def test_gguf_q8_0_keeps_blocks(ggufs, name):
    """A Q8_0 GGUF's matrices stay packed, experts included (each expert a slice of the
    file's ffn_*_exps blocks, multiplied by the quantized kernel; the router stays F32), and
    compute what the same file dequantized computes."""
    kernels_or_skip()
    ck = GGUFCheckpoint(ggufs(name, "q8_0"))
    model = load_stage(ck, quant_mode="auto")
    layer = model.model.layers["0"]
    mlp = layer.mlp.experts[0] if hasattr(layer.mlp, "experts") else layer.mlp
    mixer = getattr(layer, "linear_attn", None) or layer.self_attn
    assert isinstance(mlp.gate_up_proj, quant.QuantLinear)
    assert isinstance(getattr(mixer, "out_proj", None) or mixer.o_proj, quant.QuantLinear)
    if hasattr(layer.mlp, "experts"):
        assert model.quantized["model.layers.0.mlp.experts.7.down_proj.weight"][0] == "Q8_0"
        assert "model.layers.0.mlp.gate.weight" not in model.quantized
    dense = load_stage(ck)
    _, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    _, theirs = generate([dense], [new_cache(dense)], PROMPT, DECODE_STEPS)
    assert theirs.abs().max() > 1
    # The kernels round activations to int16 per block (~1e-4 relative per product), which
    # these random models amplify over the steps; a wrong layout would be off by O(1).
    assert (ours - theirs).abs().max() <= 5e-3 * theirs.abs().max()


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_5_moe", "qwen3_5"])
def test_decode_kernels_equal_op_by_op(ggufs, name):
    """The MoE and hybrid decode kernels (attention half in one call, every routed expert of
    a step in one call) compute what the same quantized model computes op by op, and rows
    decoded together what each gives alone."""
    kernels_or_skip()
    model = load_stage(GGUFCheckpoint(ggufs(name, "q8_0")), quant_mode="auto")
    layers = list(model.model.layers.values())
    moes = [b.mlp for b in layers if hasattr(b.mlp, "kernel_ready")]
    attended = [b for b in layers if getattr(b, "attention_args", None) is not None]
    assert all(m.kernel_ready for m in moes) and len(moes) == (0 if name == "qwen3_5" else 4)
    assert len(attended) == (4 if name == "qwen3_moe" else 1)
    _, fast = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    # Several rows per step (experts with more than one row). torch's ops on the way (the
    # router's norm, DeltaNet) round differently with the batch's shape, and an int16
    # rounding flip downstream moves these logits (largest ~6) by up to 1.5e-3 over 3 steps
    # (measured; op by op the same: 3.4e-4 at the first); a wrong row would be off by O(1).
    assert_batched_decode_equals_alone(model, [PROMPT[:7], PROMPT[2:]], [2, 0], 3, atol=4e-3,
                                       greedy=False)
    for m in moes:
        m.kernel_ready = False
    for b in attended:
        b.attention_args = None
    _, slow = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    assert slow.abs().max() > 1
    # The kernel normalizes before quantizing activations in C++, the ops in torch: int16
    # rounding that flips between them moves these random models' logits by ~5e-5 of their
    # largest (measured); a wrong layout or routing would be off by O(1).
    torch.testing.assert_close(fast, slow, atol=2e-4 * slow.abs().max(), rtol=0)


def test_deltanet_step_kernel_equals_recurrence():
    from cake.text.models.deltanet import l2norm, recurrent_delta_rule

    kernels_or_skip()
    g = torch.Generator().manual_seed(0)
    B, H, Dk, Dv = 3, 4, 16, 24
    q, k = (l2norm(torch.randn(B, 1, H, Dk, generator=g)) for _ in range(2))
    v = torch.randn(B, 1, H, Dv, generator=g)
    decay, beta = -torch.rand(B, 1, H, generator=g), torch.rand(B, 1, H, generator=g)
    state = torch.randn(B, H, Dk, Dv, generator=g)
    want, want_state = recurrent_delta_rule(q, k, v, decay, beta, state)
    got_state = state.clone()
    got = torch.ops.cake.deltanet_decode_step(q, k, v, decay, beta, got_state)
    torch.testing.assert_close(got[:, None], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state, want_state, atol=1e-5, rtol=1e-5)


def chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("name", MODELS)
def test_serve_answers_like_transformers(models, start_server, name):
    hf, folder = models(name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = chat_ids(tok, messages)
    want = greedy(hf, ids, 12)
    server = start_server(str(folder), "--temperature", "0", "--max-batch", "2",
                          "--ctx-size", "256")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=12)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)


VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
              num_position_embeddings=16)
# The Hub's form of Qwen3.5: the multimodal config (text_config inside) and the language
# model's weights under model.language_model.*, beside a vision tower.
MULTIMODAL = {
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", dict(**COMMON, **LINEAR)),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", dict(
        **COMMON, **LINEAR, **MOE, shared_expert_intermediate_size=48)),
}


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_checkpoint_serves_its_language_model(tmp_path, name):
    from test_model_parity import randomize

    cfg_name, model_name, text = MULTIMODAL[name]
    config = getattr(transformers, cfg_name)(text_config=text, vision_config=VISION,
                                             tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(config).eval()
    randomize(hf, seed=1)
    hf.save_pretrained(tmp_path)
    ck = SafetensorsCheckpoint(tmp_path)
    assert ck.config["model_type"] == f"{name}_text"
    assert not any("visual" in n for n in ck.tensor_names())
    model = load_stage(ck)
    tokens, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    theirs = transformers_logits(hf, tokens)
    assert theirs.std() > 1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_long_prompt_in_chunks(models):
    """A prompt of several DeltaNet chunks, prefilled in two steps (the second continuing
    the first's conv and recurrent state), then decoded: transformers' logits."""
    from test_model_parity import run_stages

    hf, folder = models("qwen3_5")
    model = load_stage(SafetensorsCheckpoint(folder))
    prompt = [(37 * i + 11) % 40000 for i in range(150)]
    cache = new_cache(model, max_len=256)
    # Split where transformers' own chunks end too, so both round alike.
    first = run_stages([model], [cache], [prompt[:128]], [list(range(128))], [0])[0]
    second = run_stages([model], [cache], [prompt[128:]], [list(range(128, 150))], [0])[0]
    tokens, logits = list(prompt), [first, second]
    for _ in range(3):
        tokens.append(int(logits[-1][-1].argmax()))
        logits.append(run_stages([model], [cache], [[tokens[-1]]], [[len(tokens) - 1]], [0])[0])
    torch.testing.assert_close(torch.cat(logits), transformers_logits(hf, tokens),
                               atol=1e-4, rtol=0)


def test_chunked_rule_equals_recurrent():
    from cake.text.models.deltanet import chunked_delta_rule, l2norm, recurrent_delta_rule

    g = torch.Generator().manual_seed(0)
    B, T, H, Dk, Dv = 2, 100, 3, 8, 5
    q, k = (l2norm(torch.randn(B, T, H, Dk, generator=g)) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=g)
    decay = -torch.rand(B, T, H, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, Dk, Dv, generator=g)
    want, want_state = recurrent_delta_rule(q, k, v, decay, beta, state)
    got, got_state = chunked_delta_rule(q, k, v, decay, beta, state, chunk=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state, want_state, atol=1e-5, rtol=1e-5)


def test_state_freed_with_its_sequence(models):
    """The pipeline's DeltaNet state: one per live sequence, kept under its first block and
    gone when that block is released; such a pipeline says a cached prefix cannot be reused
    (nor its blocks shared by forks or draft rows)."""
    from cake.text.kv_cache import StepBatch, kv_row_bytes
    from cake.text.linear_state import states_of
    from cake.text.pipeline import LocalPipeline

    model = load_stage(SafetensorsCheckpoint(models("qwen3_5")[1]))
    # Only the full-attention layer takes room in the KV pool: 4x the blocks of 4 layers.
    block = kv_row_bytes(model.args.num_key_value_heads, model.args.head_dim, torch.float16) * 16
    pipe = LocalPipeline([model], max_len=64, kv_memory=40 * block)
    assert pipe.prefix_reusable is False and pipe.state_is_kv is False
    assert list(pipe.caches[0].k) == [2]
    assert pipe.caches[0].block_bytes() == block and pipe.num_blocks == 40
    states = states_of(pipe.caches[0])
    positions = [list(range(len(PROMPT)))]
    pipe.forward(torch.tensor([PROMPT]), StepBatch.make(positions, [[1, 2]], "cpu"))
    per_sequence = states.held_bytes()
    linear = sum(t == "linear_attention" for t in LINEAR["layer_types"])
    assert per_sequence == linear * 4 * ((2 * 2 * 16 + 4 * 8) * 3 + 4 * 16 * 8)
    pipe.forward(torch.tensor([PROMPT]), StepBatch.make(positions, [[3, 4]], "cpu"))
    assert states.held_bytes() == 2 * per_sequence
    pipe.release(2)  # not a first block: nothing goes
    assert states.held_bytes() == 2 * per_sequence
    pipe.release(1)
    pipe.release(3)
    assert states.held_bytes() == 0
    moe = load_stage(SafetensorsCheckpoint(models("qwen3_moe")[1]))
    assert LocalPipeline([moe], max_len=64, kv_memory=1 << 20).prefix_reusable is True


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_5_moe"])
def test_offloaded_experts_compute_the_same(ggufs, name):
    """Experts read from the GGUF as they are routed, under a budget of a few experts'
    bytes (so most are evicted and read again): the logits of all experts resident."""
    kernels_or_skip()
    ck = GGUFCheckpoint(ggufs(name, "q8_0"))
    whole = load_stage(ck, quant_mode="auto")
    one = sum(whole.quantized[f"model.layers.0.mlp.experts.0.{p}.weight"][1]
              for p in ("gate_proj", "up_proj", "down_proj"))
    model = load_stage(ck, quant_mode="auto", expert_budget=3 * one)
    lru = model.expert_lru
    assert lru.mapped_bytes == 4 * 8 * one and lru.resident_bytes == 0
    _, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    _, theirs = generate([whole], [new_cache(whole)], PROMPT, DECODE_STEPS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert 0 < lru.resident_bytes <= 3 * one and lru.loads > 3 * 4
    # Experts multiplied where they lie in the repacked file's map: the pages this process
    # holds of it are those of the resident experts (each on pages of its own), not of all
    # experts ever touched.
    assert lru.packed_file is not None
    assert mapped_rss(lru.packed_file) <= lru.resident_bytes + 3 * mmap.PAGESIZE


def mapped_rss(path: str) -> int:
    """This process's resident bytes of a file's mappings (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == path
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_placement_counts_the_experts_as_loaded(ggufs):
    """Cluster placement weighs each layer by what it takes once loaded: a Q8_0 GGUF's
    experts at their packed size (each a slice of the file's ffn_*_exps)."""
    from cake.cluster.pipeline import layer_sizes
    from cake.text.expert_offload import module_bytes

    kernels_or_skip()
    ck = GGUFCheckpoint(ggufs("qwen3_5_moe", "q8_0"))
    model = load_stage(ck, quant_mode="auto")
    planned, _ = layer_sizes(ck, model.args.num_hidden_layers, torch.float32, "auto")
    for i, layer in model.model.layers.items():
        loaded = module_bytes(layer)
        experts = sum(module_bytes(e) for e in layer.mlp.experts)
        assert experts > loaded / 2  # the experts are most of the layer
        assert abs(planned[int(i)] - loaded) <= 0.02 * loaded, (i, planned[int(i)], loaded)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_serve_with_experts_over_budget(start_server, tmp_path):
    """A Q8_0 GGUF whose experts (~60 MB) are 15x the budget (4 MiB): served with
    --expert-offload it holds at most the budget of them (as /health says), its resident
    memory is that of the all-resident server less the experts, plus the budget and a fixed
    overhead, and it answers the same text."""
    kernels_or_skip()
    big = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
               intermediate_size=512, num_hidden_layers=3, num_experts=48,
               num_experts_per_tok=2, moe_intermediate_size=512, norm_topk_prob=True,
               tie_word_embeddings=False)
    build_model("Qwen3MoeConfig", "Qwen3MoeForCausalLM", big, tmp_path / "hf")
    gguf = convert(tmp_path / "hf", tmp_path / "big-q8_0.gguf", "q8_0")
    experts = sum(int(t.data.nbytes) for t in GGUFCheckpoint(gguf)._reader.tensors
                  if "_exps" in t.name)
    assert experts > 50 * 2**20
    ask = dict(model="x", messages=[{"role": "user", "content": "Tell me a story."}],
               max_tokens=16, temperature=0)
    answers, rss = [], []
    opts = [str(gguf), "--max-batch", "1", "--ctx-size", "128"]
    env = {"CAKE_NO_REPACK_CACHE": "1"}
    for extra in ([], ["--expert-offload", "--expert-memory", "4"]):
        server = start_server(*opts, *extra, env=env)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        answers.append(client.chat.completions.create(**ask).choices[0].message.content)
        rss.append(rss_bytes(server.proc.pid))
        engine = httpx.get(server.url + "/health", timeout=10).json()["engine"]
        server.stop()
    assert answers[0] == answers[1] and answers[0]
    assert engine["experts_mapped_bytes"] == experts
    assert 0 < engine["experts_resident_bytes"] <= 4 * 2**20
    overhead = 32 * 2**20  # measured 16-21 MiB: the offloaded server's own bookkeeping and heap
    assert rss[1] <= rss[0] - experts + 4 * 2**20 + overhead, (rss, experts)
