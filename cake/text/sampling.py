"""Per-sequence sampling: penalties, logit bias, grammar masks, temperature, top-k, top-p,
min-p, seeded draws, and the logprobs of what was chosen.

Penalty semantics follow their origins: repetition_penalty as in transformers (over prompt
and output, positive logits divided, negative multiplied), presence/frequency penalties as in
OpenAI (over output only, subtracted from the logits). Logprobs are the model's own
distribution (log-softmax of the raw logits, as vLLM reports them), before any of the above.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 2048
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    logprobs: Optional[int] = None  # None: off; k: the chosen token's and the k most likely
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to logit
    grammar: Optional[str] = None  # llguidance grammar the output must match
    skip_special_tokens: bool = True  # False: special tokens (tool-call markers) in the text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Nothing but the model's logits decides: no penalty, bias, grammar or logprobs."""
        return (not self.penalized and not self.logit_bias and self.grammar is None
                and self.logprobs is None)

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


def validate(params: SamplingParams, min_tokens: int = 1) -> None:
    """Raise ValueError naming the first out-of-range field (OpenAI's ranges where it has one).
    min_tokens 0: a request that only scores its prompt (completions' echo)."""
    p = params
    checks = [
        (0 <= p.temperature <= 2, f"temperature must be between 0 and 2, got {p.temperature}"),
        (0 < p.top_p <= 1, f"top_p must be in (0, 1], got {p.top_p}"),
        (isinstance(p.top_k, int) and p.top_k >= 0,
         f"top_k must be an integer >= 0, got {p.top_k}"),
        (0 <= p.min_p <= 1, f"min_p must be between 0 and 1, got {p.min_p}"),
        (-2 <= p.presence_penalty <= 2,
         f"presence_penalty must be between -2 and 2, got {p.presence_penalty}"),
        (-2 <= p.frequency_penalty <= 2,
         f"frequency_penalty must be between -2 and 2, got {p.frequency_penalty}"),
        (p.repetition_penalty > 0, f"repetition_penalty must be > 0, got {p.repetition_penalty}"),
        (isinstance(p.max_tokens, int) and p.max_tokens >= min_tokens,
         f"max_tokens must be an integer >= {min_tokens}, got {p.max_tokens}"),
        (p.logprobs is None or 0 <= p.logprobs <= 20,
         f"top_logprobs must be between 0 and 20, got {p.logprobs}"),
        (all(-100 <= b <= 100 for b in p.logit_bias.values()),
         "logit_bias values must be between -100 and 100"),
        (p.seed is None or isinstance(p.seed, int), f"seed must be an integer, got {p.seed!r}"),
        (isinstance(p.stop, list) and all(isinstance(s, str) for s in p.stop),
         "stop must be a list of strings"),
    ]
    for ok, message in checks:
        # `not ok` also rejects NaN, which fails every comparison
        if not ok:
            raise ValueError(message)


class Sampler:
    """Samples one sequence's tokens; owns its RNG and penalty state."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int,
                 device="cpu", constraint=None):
        """constraint: a grammar.Constraint built from params.grammar (None: free text)."""
        self.params = params
        self.vocab_size = vocab_size
        self.constraint = constraint
        self.generated: list[int] = []
        # (token, logprob, [(token, logprob), ...]) per token not yet sent (params.logprobs)
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            for token, b in params.logit_bias.items():
                self.bias[token] = b
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # Penalty state lives on the logits' device and is updated in place per token, so a
        # step costs the same at token 10 and token 10,000.
        self.seen = self.counts = None
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, device=device)] = True
        if params.presence_penalty != 0 or params.frequency_penalty != 0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and self.params.plain

    def record(self, token: int) -> None:
        if self.constraint is not None:
            self.constraint.accept(token)
        self.generated.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def sample(self, logits: torch.Tensor) -> int:
        token = self._choose(logits)
        if self.params.logprobs is not None:
            self.logprobs.append(token_logprobs(logits, token, self.params.logprobs))
        self.record(token)
        return token

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 copy of logits with the penalties applied; the caller's tensor is left alone."""
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries, "
                             f"sampler expects {self.vocab_size}")
        p = self.params
        x = logits.to(torch.float32, copy=True)
        if self.seen is not None:
            penalized = torch.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty)
            x = torch.where(self.seen, penalized, x)
        if self.counts is not None:
            x -= self.counts * p.frequency_penalty + (self.counts > 0) * p.presence_penalty
        if self.bias is not None:
            x += self.bias
        if self.constraint is not None:
            allowed = self.constraint.allowed().to(x.device, non_blocking=True)
            x.masked_fill_(~allowed, float("-inf"))
        return x

    def _choose(self, logits: torch.Tensor) -> int:
        if self.params.greedy:
            return int(self.penalize(logits).argmax())
        return self.draw(self.distribution(logits))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities the next token is drawn from [vocab] (float32, the caller's to
        change): penalties, bias and grammar, then temperature, top-k, top-p and min-p;
        greedy: all on the argmax."""
        p = self.params
        x = self.penalize(logits)
        if p.greedy:
            return torch.zeros_like(x).index_fill_(0, x.argmax().view(1), 1.0)
        x /= p.temperature
        if 0 < p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x[x < kth] = float("-inf")
        if p.top_p < 1:
            sorted_x, order = torch.sort(x, descending=True)
            probs = sorted_x.softmax(-1)
            # Drop a token once the more likely ones cover top_p (as transformers); the first stays.
            drop = probs.cumsum(-1) - probs >= p.top_p
            x[order[drop]] = float("-inf")
        probs = x.softmax(-1)
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0
        return probs

    def draw(self, probs: torch.Tensor) -> int:
        """A token drawn from probs (any non-negative weights) with the sequence's RNG."""
        return int(torch.multinomial(probs, 1, generator=self.generator))


def token_logprobs(logits: torch.Tensor, token: int, k: int):
    """(token, its logprob, the k most likely tokens with theirs) under the raw logits."""
    lp = logits.float().log_softmax(-1)
    top = torch.topk(lp, k) if k else None
    return (token, float(lp[token]),
            list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [])


def sample_batch(samplers: list[Sampler], logits: torch.Tensor) -> list[int]:
    """Sample one token per row of logits [B, vocab]."""
    if all(s.plain_greedy for s in samplers):
        tokens = logits.argmax(-1).tolist()  # one kernel and one device sync for the batch
        for s, t in zip(samplers, tokens):
            s.record(t)
        return tokens
    return [s.sample(row) for s, row in zip(samplers, logits)]
