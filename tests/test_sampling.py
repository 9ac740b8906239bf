import math
from collections import Counter

import pytest
import torch

from cake.text.sampling import Sampler, SamplingParams, sample_batch, validate

V = 64


def _logits(seed=0, n=V):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(params, logits, n=300):
    s = Sampler(params, [], logits.shape[-1])
    return Counter(s.sample(logits) for _ in range(n))


def test_greedy_is_argmax_for_any_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = _logits(1).to(dtype)
        s = Sampler(SamplingParams(temperature=0), [1, 2], V)
        assert s.sample(logits) == int(logits.float().argmax())
        assert s.generated == [int(logits.float().argmax())]


def test_same_seed_same_tokens():
    seq = [_logits(i) for i in range(40)]

    def run(seed):
        s = Sampler(SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=seed,
                                   frequency_penalty=0.3), [3, 4], V)
        return [s.sample(x) for x in seq]

    assert run(7) == run(7)
    assert run(7) != run(8)
    unseeded = Sampler(SamplingParams(), [], V)
    assert 0 <= unseeded.sample(seq[0]) < V


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits(2)
    best = int(logits.argmax())
    assert _draws(SamplingParams(temperature=1.5, top_k=1), logits) == Counter({best: 300})
    assert _draws(SamplingParams(temperature=1.5, top_p=1e-6), logits) == Counter({best: 300})


def test_filters_keep_the_right_tokens():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()
    assert set(_draws(SamplingParams(top_k=3), logits)) == {0, 1, 2}
    # top_p: 0.4 alone is below 0.5, so the 0.3 token is needed as well
    assert set(_draws(SamplingParams(top_p=0.5), logits)) == {0, 1}
    assert set(_draws(SamplingParams(top_p=0.75), logits)) == {0, 1, 2}
    # min_p scales with the top probability: 0.4 * 0.6 = 0.24 keeps 0.4 and 0.3
    assert set(_draws(SamplingParams(min_p=0.6), logits)) == {0, 1}
    assert set(_draws(SamplingParams(min_p=0.4), logits)) == {0, 1, 2}
    assert set(_draws(SamplingParams(), logits, n=500)) == {0, 1, 2, 3}


def test_temperature_shapes_the_distribution():
    logits = torch.tensor([1.0, 0.0])
    n = 4000
    for t in (0.5, 2.0):
        share = _draws(SamplingParams(temperature=t, seed=1), logits, n)[0] / n
        assert share == pytest.approx(1 / (1 + math.exp(-1 / t)), abs=0.03)


def test_repetition_penalty_math():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 0.0, 3.0])
    s = Sampler(SamplingParams(repetition_penalty=2.0), [0, 1], 6)
    # prompt tokens: positive divided, negative multiplied; others untouched
    assert s.penalize(logits).tolist() == [1.0, -4.0, 1.0, 0.5, 0.0, 3.0]
    s.record(5)
    assert s.penalize(logits).tolist() == [1.0, -4.0, 1.0, 0.5, 0.0, 1.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5, 0.0, 3.0]  # caller's tensor untouched


def test_presence_and_frequency_penalty_math():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 0.0, 3.0])
    # OpenAI: only generated tokens count, the prompt does not
    s = Sampler(SamplingParams(presence_penalty=1.0, frequency_penalty=0.5), [0, 1], 6)
    for t in (2, 2, 3, 2):
        s.record(t)
    # token 2: 1 - 3 * 0.5 - 1 = -1.5; token 3: 0.5 - 0.5 - 1 = -1
    assert s.penalize(logits).tolist() == [2.0, -2.0, -1.5, -1.0, 0.0, 3.0]
    both = Sampler(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), [0], 6)
    both.record(0)
    assert both.penalize(logits)[0].item() == 2.0 / 2 - 1.0


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([1.0, 0.9, 0.0])
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.5), [], 3)
    assert [s.sample(logits) for _ in range(4)] == [0, 1, 0, 1]
    negative = Sampler(SamplingParams(temperature=0, presence_penalty=-1.0), [], 3)
    assert [negative.sample(torch.tensor([0.0, 0.5, 0.9])) for _ in range(3)] == [2, 2, 2]


def test_sample_batch():
    logits = torch.stack([_logits(i) for i in range(4)])
    greedy = [Sampler(SamplingParams(temperature=0), [], V) for _ in range(4)]
    assert sample_batch(greedy, logits) == logits.argmax(-1).tolist()
    assert [s.generated for s in greedy] == [[t] for t in logits.argmax(-1).tolist()]
    # a penalised or sampled row takes the per-row path; results must match a lone sampler
    top2 = int(logits[2].argmax())
    mixed = [Sampler(SamplingParams(temperature=0), [], V),
             Sampler(SamplingParams(seed=3, top_k=5), [], V),
             Sampler(SamplingParams(temperature=0, repetition_penalty=100.0), [top2], V)]
    out = sample_batch(mixed, logits[:3])
    alone = Sampler(SamplingParams(seed=3, top_k=5), [], V).sample(logits[1])
    assert out[0] == int(logits[0].argmax()) and out[1] == alone
    assert out[2] != top2


def test_wrong_vocab_size_is_an_error():
    with pytest.raises(ValueError, match="expects 8"):
        Sampler(SamplingParams(), [], 8).sample(torch.zeros(9))


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.1), ("top_k", -1), ("min_p", 1.5), ("min_p", -0.1),
    ("presence_penalty", 2.1), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("max_tokens", 0), ("seed", 1.5), ("stop", "END"),
])
def test_validate_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        validate(SamplingParams(**{field: value}))


def test_validate_accepts_edges():
    validate(SamplingParams())
    validate(SamplingParams(temperature=0, top_p=1, top_k=0, min_p=1, presence_penalty=-2,
                            frequency_penalty=2, repetition_penalty=1.3, max_tokens=1, seed=0,
                            stop=["\n"]))
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_logit_bias_moves_the_choice():
    logits = _logits(3)
    low = int(logits.argmin())
    s = Sampler(SamplingParams(temperature=0, logit_bias={low: 100.0}), [], V)
    assert s.sample(logits) == low


def test_logprobs_are_the_raw_distribution():
    logits = _logits(4)
    s = Sampler(SamplingParams(temperature=0, logprobs=3, frequency_penalty=2.0), [], V)
    token = s.sample(logits)
    (got, lp, top), = s.logprobs
    ref = logits.log_softmax(-1)
    assert got == token and lp == pytest.approx(float(ref[token]))
    assert [t for t, _ in top] == ref.topk(3).indices.tolist()
    assert [v for _, v in top] == pytest.approx(ref.topk(3).values.tolist())


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_grammar_mask_allows_only_its_language(default_tokenizer, temperature):
    from cake.text import grammar

    tok = default_tokenizer
    lark = grammar.lark_grammar('start: ("yes" | "no") " " %json {"type": "integer"}')
    vocab = tok.vocab_size
    for seed in range(3):
        constraint = grammar.Constraint(lark, grammar.guidance_tokenizer(tok, vocab))
        s = Sampler(SamplingParams(temperature=temperature, seed=seed), [], vocab,
                    constraint=constraint)
        ids = []
        for step in range(12):
            token = s.sample(torch.randn(vocab, generator=torch.Generator().manual_seed(step)))
            if token in tok.stop_ids:
                break
            ids.append(token)
        text = tok.decode(ids)
        word, number = text.split(" ")
        assert word in ("yes", "no") and number.lstrip("-").isdigit(), text
