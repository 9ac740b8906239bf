"""`cake serve --draft-model`: a small model of the same vocabulary guesses, the model verifies.
Tiny random Llamas: the draft is the model itself (its guesses hold: the accept path) or
another random model (they fail: rejection and rollback of the draft's cache). Greedy text,
streamed or not, one at a time, n > 1 and concurrent, equals a server that never guesses; a
seeded sampled request (drafts drawn from the draft's own distribution) repeats itself; a
draft of another vocabulary is refused at start."""
from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys

import httpx
import openai
import pytest

from conftest import ROOT, Server, free_port, write_tiny_model

PROMPTS = [[{"role": "user", "content": text}] for text in (
    "Hello!", "Tell me a story about a dragon who paints.", "1, 2, 3, 4, 5, 6,",
    "Repeat after me: the cat sat on the mat, the cat sat on the mat.")]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{name: Server}: "plain" never guesses (no prompt lookup either); "same" guesses with
    the model's own weights, "other" with a different random model, at least 2 tokens a step.
    Started together, stopped by their own pids."""
    tmp = tmp_path_factory.mktemp("draft")
    model = write_tiny_model(tmp / "model", seed=0)
    other = write_tiny_model(tmp / "other", seed=1)
    common = [str(model), "--temperature", "0", "--max-batch", "8"]
    flags = {"plain": ["--draft-tokens", "0"],
             "same": ["--draft-model", str(model), "--draft-min", "2", "--kv-memory", "1MiB"],
             "other": ["--draft-model", str(other), "--draft-min", "2"]}
    started = {name: Server(common + f, tmp / f"{name}.log") for name, f in flags.items()}
    try:
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def answers(server) -> list:
    """Every way of asking: plain, streamed, n = 2, and the four prompts at once."""
    c = client(server)
    out = []
    for messages in PROMPTS:
        r = c.chat.completions.create(model="x", messages=messages, max_tokens=40)
        out.append(r.choices[0].message.content)
        out.append("".join(chunk.choices[0].delta.content or "" for chunk in
                           c.chat.completions.create(model="x", messages=messages,
                                                     max_tokens=40, stream=True)))
    r = c.chat.completions.create(model="x", messages=PROMPTS[1], max_tokens=40, n=2)
    out.append([choice.message.content for choice in r.choices])
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        out.append(list(pool.map(lambda m: c.chat.completions.create(
            model="x", messages=m, max_tokens=40).choices[0].message.content, PROMPTS)))
    return out


def engine(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()["engine"]


def test_greedy_text_equals_decoding_without_guesses(servers):
    plain = answers(servers["plain"])
    assert all(plain[:8]) and plain[8][0] == plain[8][1] == plain[2]
    assert engine(servers["plain"])["draft_tokens"] == 0
    for name in ("same", "other"):
        before = engine(servers[name])
        assert answers(servers[name]) == plain, name
        after = engine(servers[name])
        assert after["draft_model"] == ("model" if name == "same" else "other")
        shown = httpx.get(servers[name].url + "/api/v1/topology").json()["master"]
        assert shown["draft_model"]["model"] == after["draft_model"]
        assert shown["draft_model"]["layers"] == 2
        scraped = dict(line.rsplit(" ", 1) for line in httpx.get(
            servers[name].url + "/metrics").text.splitlines() if line.startswith("vllm:spec"))
        assert float(scraped['vllm:spec_decode_num_draft_tokens_total{model_name="model"}']) \
            == after["draft_tokens"]
        assert float(scraped['vllm:spec_decode_num_accepted_tokens_total{model_name="model"}']) \
            == after["draft_tokens_accepted"]
        drafted = after["draft_model_tokens"] - before["draft_model_tokens"]
        held = after["draft_model_tokens_accepted"] - before["draft_model_tokens_accepted"]
        assert drafted > 100, name
        if name == "same":  # its own guesses: all hold (ties aside)
            assert held >= 0.95 * drafted
        else:  # a different random model's: mostly rejected, the draft's cache rolled back
            assert held < 0.3 * drafted


def test_the_draft_models_cache_shares_kv_memory(servers):
    """--kv-memory bounds the model's and the draft's pools together (as many blocks each),
    and /health counts both."""
    shown = engine(servers["same"])
    block = 2 * 2 * (2 * 2 * 16 * 2) * 16  # two models x 2 layers x K+V of 2 fp16 heads of 16
    assert shown["kv_blocks_total"] == (1 << 20) // block
    assert shown["kv_cache_capacity_bytes"] == shown["kv_blocks_total"] * block
    assert shown["draft_model_kv_cache_capacity_bytes"] * 2 == shown["kv_cache_capacity_bytes"]


def test_seeded_sampling_with_draft_distributions_repeats(servers):
    """Sampled requests guess with tokens drawn from the draft's distribution (q): with the
    model's own weights nearly all hold, with another model's nearly none; either way a seed
    gives one text, alone or beside other requests."""
    for name in ("same", "other"):
        c = client(servers[name])

        def sample(seed: int) -> str:
            return c.chat.completions.create(
                model="x", messages=PROMPTS[1], max_tokens=30, temperature=0.9, top_p=0.95,
                seed=seed).choices[0].message.content

        before = engine(servers[name])
        first = sample(7)
        assert sample(7) == first and sample(8) != first
        with cf.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(sample, [7, 8, 9]))
        assert together[0] == first, name
        after = engine(servers[name])
        assert after["draft_model_tokens"] - before["draft_model_tokens"] > 50, name


def test_a_draft_of_another_vocabulary_is_refused(tmp_path, servers):
    model = write_tiny_model(tmp_path / "model", seed=0)
    wider = write_tiny_model(tmp_path / "wider", seed=0, vocab_size=49153)
    out = subprocess.run([sys.executable, "-m", "cake", "serve", str(model), "--draft-model",
                          str(wider), "--api", f"127.0.0.1:{free_port()}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last == ("cake: draft model wider has a vocabulary of 49153 tokens, the model "
                    "49152: they must share one"), out.stderr


def test_a_draft_that_tokenizes_otherwise_is_refused(default_tokenizer):
    """Same vocabulary size, but fewer merges (another version of a tokenizer): the sample
    text's ids differ."""
    import json

    import tokenizers

    from cake.text.draft_model import UnfitDraft, check_vocabulary
    from cake.text.tokenizer import Tokenizer

    spec = json.loads(default_tokenizer.tok.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][:len(spec["model"]["merges"]) // 2]
    fewer = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), None, None, None)
    assert fewer.vocab_size == default_tokenizer.vocab_size
    check_vocabulary("same", default_tokenizer, 49152, default_tokenizer, 49152)
    with pytest.raises(UnfitDraft, match="tokenizes text differently"):
        check_vocabulary("fewer", default_tokenizer, 49152, fewer, 49152)


def test_a_draft_model_is_refused_on_a_cluster(tmp_path):
    """The draft runs on one machine: with a cluster it is refused before anything starts."""
    from cake.cluster.ray_cluster import ClusterOptions
    from cake.text.draft_model import UnfitDraft
    from cake.text.serving import load_text_model

    model = write_tiny_model(tmp_path / "model", seed=0)
    with pytest.raises(UnfitDraft, match="one machine"):
        load_text_model(model, "model", cluster=ClusterOptions(key="k"),
                        draft_model=(model, "model"))


def generate(model, prompt: list[int], params) -> list[int]:
    import threading

    done = threading.Event()
    seq = model.engine.submit(prompt, params, lambda o: o.finished and done.set())
    assert done.wait(120)
    return seq.generated


def test_the_drafts_cache_follows_the_tokens_that_held(tmp_path, monkeypatch):
    """Another random model's guesses mostly fail; after each verification its cache is
    rolled back to the tokens that held. Every guess it makes must then be its own greedy
    continuation of the sequence as it stands (computed here afresh), which a cache still
    holding rejected tokens would not give. (Prompt lookup is off: a random model's
    repetitive text would otherwise take most steps from the draft model.)"""
    from cake.text.sampling import SamplingParams
    from cake.text.serving import load_text_model
    from cake.text.speculation import PromptLookup

    monkeypatch.setattr(PromptLookup, "propose", lambda self, tokens, most, rows: ([], ()))

    model = write_tiny_model(tmp_path / "model", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    spec = load_text_model(model, "model", draft_model=(other, "other"), draft_min=3)
    alone = load_text_model(other, "other", draft_tokens=0)
    try:
        proposals = []
        propose = spec.engine.drafter.propose

        def recorded(seqs, ks):
            states = [list(s.tokens) for s in seqs]
            drafts, qs = propose(seqs, ks)
            proposals.extend((t, d) for t, d in zip(states, drafts) if d)
            return drafts, qs

        spec.engine.drafter.propose = recorded
        prompt = spec.tokenizer.encode("Tell me a story about a dragon who paints.")
        greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        generate(spec, prompt, greedy)
        stats = spec.engine.stats()
        assert stats["draft_model_tokens_accepted"] < 0.3 * stats["draft_model_tokens"]
        assert len(proposals) > 15
        own = [generate(alone, tokens, SamplingParams(temperature=0, max_tokens=len(draft),
                                                      ignore_eos=True)) == draft
               for tokens, draft in proposals]
        assert sum(own) >= 0.9 * len(own), own
    finally:
        spec.close()
        alone.close()


def test_a_cached_prefix_spares_the_draft_its_keys_and_values(tmp_path):
    """A prompt's full blocks, once computed by both models, serve the next request with
    that prompt in both: the draft computes only the rest."""
    from cake.text.sampling import SamplingParams
    from cake.text.serving import load_text_model

    model = write_tiny_model(tmp_path / "model", seed=0)
    spec = load_text_model(model, "model", draft_model=(model, "model"), draft_min=2)
    try:
        computed = []
        prefill = spec.engine.drafter._prefill
        spec.engine.drafter._prefill = lambda s, a, b: (computed.append(a), prefill(s, a, b))
        prompt = spec.tokenizer.encode("A system prompt about lighthouses and keepers. " * 6)
        greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        first = generate(spec, prompt, greedy)
        assert computed[0] == 0
        computed.clear()
        assert generate(spec, prompt, greedy) == first
        full = (len(prompt) - 1) // 16 * 16  # the blocks a request maps (one token computed)
        assert spec.engine.stats()["prefix_cache_hit_tokens"] == full
        assert computed[0] == full
    finally:
        spec.close()
