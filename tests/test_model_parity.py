"""Our Llama-family code against transformers on tiny random models of each family.

Each model is built by transformers, saved as a checkpoint and loaded back through
load_stage, so config parsing, weight names, tying and the KV cache are all on the path.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cake.text.kv_cache import KVCache, StepBatch  # noqa: E402
from cake.text.loader import load_stage  # noqa: E402
from cake.text.models.llama import ModelArgs  # noqa: E402
from cake.text.weights import SafetensorsCheckpoint  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)

# name -> (transformers config class, config fields beyond TINY)
ARCHS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3.2": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "smollm2": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1,
                                    rope_parameters=dict(rope_type="default",
                                                         rope_theta=100000.0))),
    "mistral": ("MistralConfig", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False,
                                  sliding_window=4, rms_norm_eps=1e-6)),
    "qwen2-window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, attention_bias=False, rms_norm_eps=1e-6)),
    "falcon3": ("LlamaConfig", dict(head_dim=16, rope_parameters=dict(
        rope_type="default", rope_theta=1000042.0))),
}
PROMPT = [3, 17, 99, 42, 7, 64, 5, 120, 33, 8]  # longer than the sliding windows above
DECODE_STEPS = 8


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Default init gives near-zero logits (and zero biases); make every weight matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


def legacy_config(folder) -> None:
    """Rewrite config.json the way transformers 4 wrote it: rope_theta and rope_scaling."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, checkpoint folder), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            cls_name, fields = ARCHS[name.removesuffix("-legacy")]
            config = getattr(transformers, cls_name)(**{**TINY, **fields})
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation="eager", dtype=torch.float32)
            randomize(hf, seed=len(built))
            hf.eval()
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            if name.endswith("-legacy"):
                legacy_config(folder)
            built[name] = hf, folder
        return built[name]

    return get


def new_cache(model, num_slots=1, max_len=64):
    a = model.args
    return KVCache(range(model.start, model.end), num_slots, max_len, a.num_key_value_heads,
                   a.head_dim, torch.float32, "cpu")


@torch.no_grad()
def run_stages(stages, caches, tokens, positions, slots):
    """One step through a list of stages: token ids in, logits out."""
    batch = StepBatch.make(positions, slots, "cpu")
    x = torch.tensor(tokens)
    for stage, cache in zip(stages, caches):
        x = stage(x, batch, cache)
    return x


def generate(stages, caches, prompt, steps, slot=0):
    """Prefill the prompt, then decode greedily one token at a time. Returns the tokens fed
    and the logits at each of their positions, [len(tokens), V]."""
    tokens = list(prompt)
    logits = [run_stages(stages, caches, [tokens], [list(range(len(tokens)))], [slot])[0]]
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        pos = len(tokens) - 1
        logits.append(run_stages(stages, caches, [[tokens[-1]]], [[pos]], [slot])[0])
    return tokens, torch.cat(logits)


@pytest.mark.parametrize("name", list(ARCHS) + ["llama3.2-legacy", "mistral-legacy"])
def test_logits_match_transformers(checkpoints, name):
    hf, folder = checkpoints(name)
    model = load_stage(SafetensorsCheckpoint(folder))
    tokens, ours = generate([model], [new_cache(model)], PROMPT, DECODE_STEPS)
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0]
    assert theirs.std() > 1, "logits too small for the comparison to mean anything"
    assert ours.shape == theirs.shape == (len(PROMPT) + DECODE_STEPS, TINY["vocab_size"])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3"])
def test_paged_cache_matches_transformers(checkpoints, name):
    """Two sequences in a pool of 4-position blocks, their blocks scattered and interleaved:
    prefill in chunks that cross blocks (PyTorch path) and decode together (the kernel reads
    the blocks in place through the tables): every row's logits are transformers' own."""
    hf, folder = checkpoints(name)
    model = load_stage(SafetensorsCheckpoint(folder))
    a = model.args
    cache = KVCache.pool(range(a.num_hidden_layers), 16, 4, a.num_key_value_heads, a.head_dim,
                         torch.float32, "cpu")
    prompts = [PROMPT, PROMPT[::-1][:7]]
    tables = [[9, 2, 14, 5, 0], [11, 3, 7, 12, 1]]
    logits = [[], []]
    for r, p in enumerate(prompts):
        for start, end in ((0, 3), (3, len(p))):
            out = run_stages([model], [cache], [p[start:end]], [list(range(start, end))],
                             [tables[r]])[0]
            logits[r].append(out)
    tokens = [list(p) for p in prompts]
    for _ in range(DECODE_STEPS):
        for r in range(2):
            tokens[r].append(int(logits[r][-1][-1].argmax()))
        out = run_stages([model], [cache], [[t[-1]] for t in tokens],
                         [[len(t) - 1] for t in tokens], tables)
        for r in range(2):
            logits[r].append(out[r])
    for r in range(2):
        with torch.no_grad():
            theirs = hf(torch.tensor([tokens[r]])).logits[0]
        torch.testing.assert_close(torch.cat(logits[r]), theirs, atol=1e-4, rtol=0)


def test_config_parsing(checkpoints):
    def args(name):
        return ModelArgs.from_config(SafetensorsCheckpoint(checkpoints(name)[1]).config)

    for name in ("llama3.2", "llama3.2-legacy"):
        a = args(name)
        assert a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"
        assert a.tie_word_embeddings
    assert args("llama").rope_scaling is None and not args("llama").tie_word_embeddings
    assert args("falcon3").rope_theta == 1000042.0
    assert [args("mistral").window(i) for i in range(3)] == [4, 4, 4]
    assert [args("qwen2").window(i) for i in range(3)] == [None, None, None]
    assert [args("qwen2-window").window(i) for i in range(3)] == [None, 4, 4]
    q3 = args("qwen3")
    assert (q3.head_dim, q3.qk_norm, q3.qkv_bias) == (32, "head", False)
    q2 = args("qwen2")
    assert (q2.qkv_bias, q2.attention_bias) == (True, False)


@pytest.mark.parametrize("name", ["llama3.2", "llama-bias"])
def test_rope_frequencies_match_transformers(checkpoints, name):
    hf, folder = checkpoints(name)
    model = load_stage(SafetensorsCheckpoint(folder))
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["llama", "llama3.2", "mistral"])
@pytest.mark.parametrize("split", [1, 2])
def test_pipeline_stages_equal_whole_model(checkpoints, name, split):
    ck = SafetensorsCheckpoint(checkpoints(name)[1])
    whole = load_stage(ck)
    stages = [load_stage(ck, 0, split), load_stage(ck, split, TINY["num_hidden_layers"])]
    assert stages[0].is_first and not stages[0].is_last
    assert stages[1].is_last and not stages[1].is_first
    hidden = run_stages(stages[:1], [new_cache(stages[0])], [PROMPT], [list(range(10))], [0])
    assert hidden.shape == (1, len(PROMPT), TINY["hidden_size"])
    tokens, expected = generate([whole], [new_cache(whole)], PROMPT, DECODE_STEPS)
    tokens_staged, got = generate(stages, [new_cache(s) for s in stages], PROMPT, DECODE_STEPS)
    assert tokens_staged == tokens
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def assert_batched_decode_equals_alone(model, prompts, slots, steps, atol, greedy=True):
    """Rows decoded together (in the given cache slots) give each row's logits alone;
    greedy: the batch's argmax is also the token each row chose alone."""
    alone = [generate([model], [new_cache(model)], p, steps) for p in prompts]
    cache = new_cache(model, num_slots=max(slots) + 1)
    last = [run_stages([model], [cache], [p], [list(range(len(p)))], [s])[0, -1]
            for p, s in zip(prompts, slots)]
    for step in range(steps):
        logits = torch.stack(last)
        for (tokens, expected), row, p in zip(alone, logits, prompts):
            torch.testing.assert_close(row, expected[len(p) - 1 + step], atol=atol, rtol=0)
        next_tokens = [[tokens[len(p) + step]] for (tokens, _), p in zip(alone, prompts)]
        if greedy:
            assert next_tokens == [[int(row.argmax())] for row in logits]
        positions = [[len(p) + step] for p in prompts]
        last = list(run_stages([model], [cache], next_tokens, positions, slots)[:, -1])


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3"])
def test_batched_decode_equals_single(checkpoints, name):
    model = load_stage(SafetensorsCheckpoint(checkpoints(name)[1]))
    assert_batched_decode_equals_alone(model, [PROMPT[:5], PROMPT[1:]], [2, 0], 4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_batched_and_chunked_prefill(checkpoints, name):
    model = load_stage(SafetensorsCheckpoint(checkpoints(name)[1]))
    whole = run_stages([model], [new_cache(model)], [PROMPT], [list(range(10))], [0])[0]

    # Two rows of the same length in one step, in two slots.
    cache = new_cache(model, num_slots=2)
    other = PROMPT[::-1]
    both = run_stages([model], [cache], [other, PROMPT], [list(range(10))] * 2, [0, 1])
    torch.testing.assert_close(both[1], whole, atol=1e-5, rtol=0)

    # The same prompt in two chunks, the second attending to the cached first.
    cache = new_cache(model)
    first = run_stages([model], [cache], [PROMPT[:6]], [list(range(6))], [0])[0]
    second = run_stages([model], [cache], [PROMPT[6:]], [list(range(6, 10))], [0])[0]
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=0)

    # logits_at picks one position per row.
    batch = StepBatch.make([list(range(10))] * 2, [0, 1], "cpu")
    picked = model(torch.tensor([other, PROMPT]), batch, new_cache(model, 2),
                   logits_at=torch.tensor([3, 9]))
    torch.testing.assert_close(picked, torch.stack([both[0, 3], both[1, 9]]), atol=1e-5, rtol=0)


class RecordingCheckpoint(SafetensorsCheckpoint):
    def __init__(self, folder):
        super().__init__(folder)
        self.read = set()

    def get(self, name):
        self.read.add(name)
        return super().get(name)


def test_untied_head_loads_lm_head(checkpoints):
    hf, folder = checkpoints("llama")
    ck = RecordingCheckpoint(folder)
    assert "lm_head.weight" in ck.tensor_names()
    last = load_stage(ck, 2, 3)
    torch.testing.assert_close(last.lm_head.weight, hf.lm_head.weight, atol=0, rtol=0)
    assert not torch.equal(last.lm_head.weight, hf.model.embed_tokens.weight)
    assert ck.read == set(last.tensor_names())
    assert "model.embed_tokens.weight" not in ck.read


@pytest.mark.parametrize("name", ["llama3.2", "qwen2"])
def test_tied_head_reuses_embeddings(checkpoints, name):
    hf, folder = checkpoints(name)
    ck = RecordingCheckpoint(folder)
    assert "lm_head.weight" not in ck.tensor_names()
    embed = ck.get("model.embed_tokens.weight")

    whole = load_stage(ck)
    assert whole.lm_head is None  # the head is the embedding, not a copy

    # A last stage without the embeddings reads them for its head, and only them.
    ck.read.clear()
    last = load_stage(ck, 1, 3)
    assert not hasattr(last.model, "embed_tokens")
    torch.testing.assert_close(last.lm_head.weight, embed, atol=0, rtol=0)
    assert ck.read == set(last.tensor_names())
    assert "model.embed_tokens.weight" in ck.read
    assert not any(n.startswith(("model.layers.0.", "lm_head")) for n in ck.read)

    # Every checkpoint tensor is needed by some stage, and nothing else is asked for.
    needed = set()
    for start, end in [(0, 1), (1, 2), (2, 3)]:
        needed |= set(load_stage(ck, start, end).tensor_names())
    assert needed == set(ck.tensor_names())


def test_bf16_stage_runs(checkpoints):
    _, folder = checkpoints("llama3.2")
    ck = SafetensorsCheckpoint(folder)
    model = load_stage(ck, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32
    cache = KVCache(range(3), 1, 32, 2, 16, torch.bfloat16, "cpu")
    got = run_stages([model], [cache], [PROMPT], [list(range(10))], [0])[0].float()
    ref = load_stage(ck)
    expected = run_stages([ref], [new_cache(ref)], [PROMPT], [list(range(10))], [0])[0]
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
