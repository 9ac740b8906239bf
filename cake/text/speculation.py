"""Speculative decoding: guess a sequence's next tokens, verify them in one forward.

Drafts come from prompt lookup: the longest suffix (up to MAX_ORDER tokens) of the sequence
that occurred earlier in its prompt or output, and the tokens that followed it there (copied
text repeats itself). The engine feeds the draft as extra rows of the sequence's decode step;
row j's logits are the model's distribution after draft[:j].

How far to guess is a per-sequence bet: each match order (how many tokens matched), and each
matched n-gram itself, keep a count of the draft tokens that held and of the guesses that
failed; the chance that a guess holds is the n-gram's record shrunk towards its order's, and
the draft length is the one that maximises the expected tokens per step over the step's cost.
Free text, whose short matches rarely hold, stops guessing; copied text guesses far; a
context that keeps guessing wrong stops while the rest of the copy goes on. Only the
sequence's own history decides, so a seeded request samples the same text alone or in a batch.

Verification keeps the output's distribution: greedy rows accept while the argmax agrees;
sampled rows accept draft token d with probability p(d) and otherwise draw from p with d
removed, renormalised (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023, with
the draft distribution a point mass on d), where p is the sampler's own distribution after
penalties, temperature, top-k, top-p and min-p, given the tokens accepted before.
"""
from __future__ import annotations

import torch

MAX_ORDER = 4  # longest suffix looked up; longer matches are counted as this order
# Cost of one extra row of a decode step relative to the step (CPU, the default model, one
# thread: 2, 3 and 5 rows measured ~1.1x, 1.2x and 1.5x one row): the weights are unpacked
# once for all rows, each row adds its products, attention and logits.
ROW_COST = 0.15
# A first guess per order (longer matches predict better), worth two trials; free text's
# short matches then cost a few rows before their record stops them
PRIOR_TRIALS = 2.0
PRIOR_HOLDS = (0.0, 0.25, 0.4, 0.5, 0.6)
CONTEXT_WEIGHT = 2.0  # trials of the broader record a narrower one starts from
MEMORY = 64  # trials per order remembered: past that the counts halve, so the bet follows
# the text as it changes between free and copied


class PromptLookup:
    """One sequence's n-gram index and its record of how well each match order guessed."""

    def __init__(self) -> None:
        # order n -> {n tokens: the index just after their latest occurrence}
        self.index: list[dict] = [{} for _ in range(MAX_ORDER + 1)]
        self.indexed = 0  # tokens[:indexed] have their n-grams ending there indexed
        self.held = [PRIOR_TRIALS * a for a in PRIOR_HOLDS]
        self.trials = [PRIOR_TRIALS] * (MAX_ORDER + 1)
        self.contexts: dict[tuple, list[float]] = {}  # n-gram -> [held, trials]

    def _extend(self, tokens: list[int]) -> None:
        """Index the n-grams that end before the newest token (each needs a token after it)."""
        for end in range(max(self.indexed, 1), len(tokens)):
            for n in range(1, min(MAX_ORDER, end) + 1):
                self.index[n][tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, len(tokens))

    def propose(self, tokens: list[int], most: int) -> tuple[list[int], tuple]:
        """(draft, matched n-gram) for the sequence `tokens`: at most `most` tokens, as many
        as the records say pay; ([], ()) when nothing matches."""
        if most <= 0 or len(tokens) < 2:
            return [], ()
        self._extend(tokens)
        for n in range(min(MAX_ORDER, len(tokens) - 1), 0, -1):
            context = tuple(tokens[len(tokens) - n:])
            at = self.index[n].get(context)
            if at is not None:
                return tokens[at:at + draft_length(self.holds(context), most)], context
        return [], ()

    def holds(self, context: tuple) -> float:
        """The chance that a draft token after this n-gram holds (given the ones before)."""
        n = len(context)
        alpha = self.held[n] / self.trials[n]
        held, trials = self.contexts.get(context, (0.0, 0.0))
        return (held + CONTEXT_WEIGHT * alpha) / (trials + CONTEXT_WEIGHT)

    def observe(self, context: tuple, proposed: int, held: int) -> None:
        """A draft of `proposed` tokens after this n-gram was verified and its first `held`
        held: `held` successes and, if it broke off, one failure (the tokens after it were
        never tried)."""
        trials = held + (held < proposed)
        record = self.contexts.setdefault(context, [0.0, 0.0])
        record[0] += held
        record[1] += trials
        n = len(context)
        self.held[n] += held
        self.trials[n] += trials
        if self.trials[n] > MEMORY:
            self.held[n] /= 2
            self.trials[n] /= 2


def draft_length(alpha: float, most: int, row_cost: float = ROW_COST) -> int:
    """The k in 0..most that maximises expected tokens per step over its cost, when each
    draft token holds with probability alpha given the ones before held: a step of k guesses
    yields (1 - alpha^(k+1)) / (1 - alpha) tokens and costs 1 + row_cost * k."""
    best, best_rate, expected, p = 0, 1.0, 1.0, 1.0
    for k in range(1, most + 1):
        p *= alpha
        expected += p
        rate = expected / (1 + row_cost * k)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def verify_greedy(choices: list[int], draft: list[int]) -> list[int]:
    """choices: the argmax of each of the len(draft) + 1 rows. The tokens decoding one at a
    time would give: the draft while it agrees, then the model's own choice."""
    held = 0
    while held < len(draft) and choices[held] == draft[held]:
        held += 1
    return choices[:held + 1]


def verify_sampled(sampler, draft: list[int], logits: torch.Tensor) -> list[int]:
    """Speculative sampling of len(draft) + 1 rows of logits with the sequence's sampler (its
    RNG): the accepted draft tokens and one more. Each is recorded in the sampler as it is
    chosen, so that penalties follow them row by row as when sampling one at a time; their
    logprobs are the caller's to note, as it sends them."""
    out: list[int] = []
    for j, d in enumerate(draft):
        probs = sampler.distribution(logits[j])
        u = float(torch.rand((), generator=sampler.generator, device=probs.device))
        if u >= float(probs[d]):
            probs[d] = 0  # the residual: p without the draft token
            if float(probs.sum()) > 0:  # else p(d) fell short of 1 by rounding alone: d holds
                out.append(sampler.draw(probs))
                sampler.record(out[-1])
                return out
        out.append(d)
        sampler.record(d)
    out.append(sampler.draw(sampler.distribution(logits[len(draft)])))
    sampler.record(out[-1])
    return out
