"""Speculative decoding (cake/text/speculation.py): the prompt-lookup drafter, the draft-length
rule, and speculative sampling keeping the sampler's distribution: exactly, against a reference
written here, and through the engine on the embedded default model (speculative against
non-speculative token histograms). Fixed seeds: a test fails only if the distribution is wrong
(or at the 1e-3 tail of the chi-square statistic, deterministically for these seeds)."""
from __future__ import annotations

import math
import threading
from collections import Counter

import pytest
import torch

from cake.text.sampling import Sampler, SamplingParams
from cake.text.speculation import (PromptLookup, draft_length, guess_cost, step_cost,
                                   verify_greedy, verify_sampled)


def chi2_limit(df: int, z: float = 3.09) -> float:
    """The chi-square statistic's 1 - 1e-3 quantile (Wilson-Hilferty; z = its normal quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_stat(counts: Counter, probs: torch.Tensor) -> float:
    """The chi-square statistic of token counts against probs, over its support."""
    n = sum(counts.values())
    return sum((counts[t] - n * float(probs[t])) ** 2 / (n * float(probs[t]))
               for t in range(len(probs)) if probs[t] > 0)


def assert_fits(counts: Counter, probs: torch.Tensor) -> None:
    """Observed token counts fit the distribution probs: nothing outside its support, and a
    chi-square goodness of fit below the 1e-3 tail."""
    support = [t for t in range(len(probs)) if probs[t] > 0]
    assert set(counts) <= set(support), (counts, probs)
    stat = chi2_stat(counts, probs)
    assert stat < chi2_limit(len(support) - 1), (stat, counts, probs * sum(counts.values()))


def reference(logits: torch.Tensor, seen: list[int], p: SamplingParams) -> torch.Tensor:
    """The distribution one-at-a-time sampling draws from, written out: repetition penalty
    over the tokens seen, temperature, top-k."""
    x = logits.double().clone()
    for t in set(seen):
        x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    x /= p.temperature
    x[x < torch.topk(x, p.top_k).values[-1]] = float("-inf")
    return x.softmax(-1)


def test_lookup_follows_the_longest_earlier_suffix():
    lookup = PromptLookup()
    # "7 8" occurred before "1 2 3", but the longest suffix "9 7 8" last occurred before "4"
    tokens = [9, 7, 8, 4, 5, 6, 0, 7, 8, 1, 2, 3, 9, 7, 8]
    lookup.held, lookup.trials = [10.0] * 5, [10.0] * 5  # a record of drafts that always hold
    assert lookup.propose(tokens, 3) == ([4, 5, 6], (9, 7, 8))
    assert lookup.propose(tokens + [11], 3) == ([], ())  # 11 never occurred before
    lookup = PromptLookup()
    lookup.held[1] = lookup.trials[1] = 10.0
    assert lookup.propose([5, 6, 5], 4) == ([6, 5], (5,))  # up to the newest token


def test_draft_length_pays_only_where_guesses_hold():
    assert draft_length(0.05, 4) == 0  # free text: one extra row costs more than it wins
    assert draft_length(0.5, 8) in (1, 2, 3)
    assert draft_length(0.95, 6) == 6
    lookup = PromptLookup()
    lookup.held[1], lookup.trials[1] = 9.0, 10.0  # single-token matches have held
    for _ in range(10):  # but the ones after token 5 always fail: those stop
        lookup.observe((5,), 2, 0)
    assert lookup.holds((5,)) < 0.1 and lookup.holds((6,)) == 9 / 20
    assert lookup.propose([5, 6, 5], 4) == ([], (5,))
    assert PromptLookup().propose([6, 8, 6], 4)[0] == [8]  # a fresh order-1 bet: one token


def test_in_a_busy_batch_only_a_copy_is_worth_guessing():
    """Beside other sequences an extra row costs a sequence more than its share of the step:
    weak guesses stop beside one other, a copy goes on beside one other and stops beside
    seven."""
    costs = [guess_cost(1, rows) for rows in (1, 2, 4, 8)]
    assert costs[0] == pytest.approx(step_cost(2) - 1)
    assert costs == sorted(costs) and costs[2] > 1
    assert draft_length(0.35, 4) >= 1
    assert draft_length(0.35, 4, rows=2) == 0
    assert draft_length(0.95, 4, rows=2) >= 2
    assert draft_length(0.95, 4, rows=8) == 0
    lookup = PromptLookup()
    lookup.held[1], lookup.trials[1] = 3.5, 10.0
    assert lookup.propose([5, 6, 5], 4)[0] == [6]
    assert lookup.propose([5, 6, 5], 4, rows=2)[0] == []


def test_a_copy_guesses_a_whole_tile_rather_than_one_row_past_one():
    """8 rows are one tile of the kernels and cost less than 5 (a tile of 4 and one of 1): a
    copy guesses 7 or 3 tokens, not 4."""
    assert step_cost(8) < step_cost(7) and step_cost(5) - step_cost(4) > 0.3
    assert draft_length(0.9, 7) == 7
    assert draft_length(0.9, 4) == 3


def test_greedy_verification_is_one_token_at_a_time():
    assert verify_greedy([4, 5, 6], [4, 5]) == [4, 5, 6]
    assert verify_greedy([4, 9, 6], [4, 5]) == [4, 9]
    assert verify_greedy([3, 5, 6], [4, 5]) == [3]


def test_speculative_sampling_keeps_the_samplers_distribution():
    """Rows of fixed logits, a draft of a likely and an unlikely token: the first token has
    row 0's distribution, the second (after the first draft token held) row 1's with the
    repetition penalty now over that token too, the third row 2's; rejections draw from the
    residual, which these histograms would show if it were wrong."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, generator=g) * 1.5
    params = SamplingParams(temperature=0.8, top_k=6, repetition_penalty=1.4)
    prompt = [2]
    probs0 = reference(logits[0], prompt, params)
    d0 = int(probs0.argmax())
    probs1 = reference(logits[1], prompt + [d0], params)
    d1 = int(probs1.argsort()[-3])  # the third most likely: rejected most of the time
    probs2 = reference(logits[2], prompt + [d0, d1], params)
    first, second, third = Counter(), Counter(), Counter()
    for seed in range(12000):
        sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}), prompt, 8)
        out = verify_sampled(sampler, [d0, d1], logits)
        assert sampler.generated == out and 1 <= len(out) <= 3
        first[out[0]] += 1
        if out[0] == d0:
            second[out[1]] += 1
            if out[1] == d1:
                third[out[2]] += 1
    assert_fits(first, probs0)
    assert_fits(second, probs1)
    assert_fits(third, probs2)
    assert 0 < second[d1] < sum(second.values()) / 2  # both branches were taken


def draft_model_rounds(params: SamplingParams, logits, draft_logits, seeds: int, rule):
    """What the engine does with a draft model's guesses, one sequence at a time: two draft
    tokens drawn from q (the draft's distribution under the sequence's sampler), verified
    by `rule`; the histograms of the first, second and third tokens out."""
    first, second, third = Counter(), Counter(), Counter()
    for seed in range(seeds):
        sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}), [2], 8)
        q = [sampler.distribution(row) for row in draft_logits]
        draft = [sampler.draw(x) for x in q]
        out = rule(sampler, draft, logits, q)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        if len(out) > 2:
            third[out[2]] += 1
    return first, second, third


def residual_from_p(sampler, draft, logits, q):
    """A broken rule: accept with min(1, p/q) as it should, but on a rejection draw from p
    instead of max(0, p - q), which counts p's mass where q covers it twice."""
    out = []
    for j, d in enumerate(draft):
        probs = sampler.distribution(logits[j])
        if float(torch.rand((), generator=sampler.generator)) * float(q[j][d]) >= float(probs[d]):
            out.append(sampler.draw(probs))
            return out
        out.append(d)
    return out + [sampler.draw(sampler.distribution(logits[len(draft)]))]


def test_speculative_sampling_with_a_draft_distribution_keeps_the_samplers():
    """Draft tokens drawn from a real distribution q (a draft model's logits under the same
    temperature, top-k and top-p as p, from a different model: q differs from p): each token
    out has p's distribution, and more drafts hold than under the point-mass rule (which is
    exact for any draft token too, but ignores what q knows). Drawing a rejection's token
    from p rather than the residual fails the same test."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, generator=g) * 1.5
    draft_logits = logits[:2] + torch.randn(2, 8, generator=g) * 1.5
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.97)
    probs = [Sampler(params, [2], 8).distribution(row) for row in logits]
    q = [Sampler(params, [2], 8).distribution(row) for row in draft_logits]
    assert all(float((a - b).abs().sum()) > 0.4 for a, b in zip(probs, q))  # far from p
    assert all(float(x.max()) < 0.9 for x in q)  # no point mass
    first, second, third = draft_model_rounds(params, logits, draft_logits, 12000,
                                              verify_sampled)
    for counts, p in zip((first, second, third), probs):
        assert_fits(counts, p)
    assert 500 < sum(third.values()) and sum(second.values()) < 11000  # both branches
    point_mass = draft_model_rounds(params, logits, draft_logits, 6000,
                                    lambda sampler, d, x, q: verify_sampled(sampler, d, x))
    assert_fits(point_mass[0], probs[0])
    assert sum(second.values()) / 12000 > 1.3 * sum(point_mass[1].values()) / 6000
    broken = draft_model_rounds(params, logits, draft_logits, 6000, residual_from_p)
    assert chi2_stat(broken[0], probs[0]) > 3 * chi2_limit(len(probs[0].nonzero()) - 1)


def test_a_draft_with_all_the_mass_is_kept_whatever_rounding_says():
    """top_k 1 leaves the draft token all the mass; were p(d) read a hair under 1, the residual
    would be empty (a soak run hit "invalid multinomial distribution" there): d holds."""
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [5.0, 0.0, 1.0]])
    for seed in range(20):
        sampler = Sampler(SamplingParams(temperature=0.8, top_k=1, seed=seed), [0], 3)
        real = sampler.distribution
        # p(d) read under 1 (half, so that most seeds take that branch), the rest still 0
        sampler.distribution = lambda row: real(row) * 0.5
        assert verify_sampled(sampler, [1, 2], logits) == [1, 2, 0]


def test_greedy_with_penalties_verifies_as_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9], [0.0, 0.0, 5.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, seed=1)
    # row 1: token 0 (2.0) is penalized to 1.0 once seen in the prompt, so 2 (1.9) wins
    assert verify_sampled(Sampler(params, [0], 3), [1, 0], logits) == [1, 2]
    assert verify_sampled(Sampler(params, [0], 3), [1, 2], logits) == [1, 2, 2]


def two_sample_fits(a: Counter, b: Counter) -> None:
    """Two histograms of as many samples are of one distribution: chi-square over the
    categories seen at least 10 times in all (the rest pooled), below the 1e-3 tail."""
    common = [c for c in set(a) | set(b) if a[c] + b[c] >= 10]
    rest = (sum(a.values()) - sum(a[c] for c in common), sum(b.values()) - sum(b[c] for c in common))
    cells = [(a[c], b[c]) for c in common] + ([rest] if sum(rest) else [])
    stat = sum((x - y) ** 2 / (x + y) for x, y in cells)
    assert len(cells) > 2 and stat < chi2_limit(len(cells) - 1), (stat, cells)


@pytest.fixture(scope="module")
def default_model():
    from conftest import default_gguf

    from cake.text.serving import load_text_model

    model = load_text_model(default_gguf(), "default", draft_tokens=4)
    yield model
    model.close()


def generate_all(engine, prompt: list[int], params: list[SamplingParams]) -> list[list[int]]:
    """Each params' tokens, as choices of one prompt (n > 1: one prefill, 50 forks each)."""
    done, seqs = threading.Semaphore(0), []
    for i in range(0, len(params), 50):
        chunk = params[i:i + 50]
        seqs += engine.submit_choices(prompt, chunk, [lambda o: o.finished and done.release()
                                                      for _ in chunk])
    for _ in params:
        assert done.acquire(timeout=300)
    return [s.generated for s in seqs]


def test_engine_sampled_speculation_matches_plain_sampling(default_model):
    """The embedded default model continuing a repeating list, 600 seeded samples with
    temperature, top-k, top-p and a presence penalty: the second and third tokens (decoded
    with drafts from prompt lookup) have the same histograms with speculation as without."""
    from cake.text.engine import Engine

    tok = default_model.tokenizer
    prompt = tok.encode("red, blue, green, red, blue, green, red, blue, green, red, blue,")
    params = [SamplingParams(temperature=2.0, top_k=8, top_p=0.95, presence_penalty=0.4,
                             max_tokens=3, ignore_eos=True, seed=s) for s in range(600)]
    spec = default_model.engine
    before = spec.draft_accepted, spec.drafted
    with_drafts = generate_all(spec, prompt, params)
    accepted, drafted = spec.draft_accepted - before[0], spec.drafted - before[1]
    assert 0 < accepted < drafted  # drafts held, and some were rejected
    spec.shutdown()
    plain = Engine(spec.pipeline, tok, spec.vocab_size, draft_tokens=0)
    plain.start()
    try:
        without = generate_all(plain, prompt, [SamplingParams(**{**p.__dict__, "seed": p.seed + 10_000})
                                               for p in params])
    finally:
        plain.shutdown()
    assert plain.drafted == 0
    for position in (1, 2):
        two_sample_fits(Counter(g[position] for g in with_drafts),
                        Counter(g[position] for g in without))
    two_sample_fits(Counter(tuple(g[1:3]) for g in with_drafts),
                    Counter(tuple(g[1:3]) for g in without))
