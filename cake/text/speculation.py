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

A small draft model of the same vocabulary (cake/text/draft_model.py) guesses too: where it
runs, each sequence keeps a DraftRecord of how its tokens held, and the draft length is chosen
the same way, each guess costing its verification row plus a step of the draft model
(its size over the target's). A step takes whichever guess, prompt lookup's or the model's,
promises more tokens for its cost.

Verification keeps the output's distribution: greedy rows accept while the argmax agrees;
sampled rows accept draft token d with probability p(d) and otherwise draw from p with d
removed, renormalised (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023, with
the draft distribution a point mass on d); a draft model's token d, drawn from its
distribution q, holds with probability min(1, p(d) / q(d)), else the token comes from
max(0, p - q) renormalised; where p is the sampler's own distribution after
penalties, temperature, top-k, top-p and min-p, given the tokens accepted before.
"""
from __future__ import annotations

from typing import Optional

import torch

MAX_ORDER = 4  # longest suffix looked up; longer matches are counted as this order
# Cost of a decode step of n = 1..8 rows (a sequence's token and n - 1 guesses) relative to
# one row (CPU kernels, the default model's products and head, 2 threads, 2026-12-02). The
# kernels take rows in tiles of 8, 4 and the last 1-3, the weights unpacked once per tile: up
# to 4 rows each adds its products (~0.17), a 5th starts a tile of its own, and 8 rows, one
# tile, cost less than 7. Past 8 rows: linear at the 8-row tile's rate.
STEP_COST = (1.0, 1.13, 1.31, 1.50, 1.93, 2.11, 2.32, 2.08)
# A first guess per order (longer matches predict better), worth two trials; free text's
# short matches then cost a few rows before their record stops them
PRIOR_TRIALS = 2.0
PRIOR_HOLDS = (0.0, 0.25, 0.4, 0.5, 0.6)
CONTEXT_WEIGHT = 2.0  # trials of the broader record a narrower one starts from
MEMORY = 64  # trials per order remembered: past that the counts halve, so the bet follows
# the text as it changes between free and copied
# A draft model's first guess, worth PRIOR_TRIALS trials: hopeful, so that a draft that is
# cheap enough gets tried and its measured record decides from then on
MODEL_PRIOR_HOLDS = 0.8
# Per step a sequence's draft model does not guess: its record's pull back to the prior. Slow:
# a bad draft is tried again every few hundred steps (each try first catches the draft up on
# the tokens it missed), a stretch it failed at does not stop it for good.
IDLE_DECAY = 0.995


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

    def propose(self, tokens: list[int], most: int, rows: int = 1) -> tuple[list[int], tuple]:
        """(draft, matched n-gram) for the sequence `tokens`: at most `most` tokens, as many
        as the records say pay in a step of `rows` sequences (see guess_cost); ([], ()) when
        nothing matches."""
        if most <= 0 or len(tokens) < 2:
            return [], ()
        self._extend(tokens)
        for n in range(min(MAX_ORDER, len(tokens) - 1), 0, -1):
            context = tuple(tokens[len(tokens) - n:])
            at = self.index[n].get(context)
            if at is not None:
                return tokens[at:at + draft_length(self.holds(context), most, rows)], context
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


class DraftRecord:
    """How often one sequence's draft-model tokens held: the chance that the next one holds.
    Counted as PromptLookup counts an order; while the record keeps the model from guessing
    it drifts back to the prior (IDLE_DECAY a step)."""

    def __init__(self, start: float = MODEL_PRIOR_HOLDS, prior: float = MODEL_PRIOR_HOLDS):
        """start: the first guess of the chance (worth PRIOR_TRIALS trials); prior: the
        chance an idle record drifts back to."""
        self.prior = prior
        self.held, self.trials = PRIOR_TRIALS * start, PRIOR_TRIALS

    def holds(self) -> float:
        return self.held / self.trials

    def observe(self, proposed: int, held: int) -> None:
        self.held += held
        self.trials += held + (held < proposed)
        if self.trials > MEMORY:
            self.held /= 2
            self.trials /= 2

    def idle(self) -> None:
        self.held = self.held * IDLE_DECAY + (1 - IDLE_DECAY) * PRIOR_TRIALS * self.prior
        self.trials = self.trials * IDLE_DECAY + (1 - IDLE_DECAY) * PRIOR_TRIALS


def step_cost(rows: int) -> float:
    """A decode step of this many rows, relative to one row (STEP_COST)."""
    if rows <= len(STEP_COST):
        return STEP_COST[rows - 1]
    return STEP_COST[-1] * rows / len(STEP_COST)


def guess_cost(k: int, rows: int = 1) -> float:
    """What k guessed rows cost a sequence decoded beside rows - 1 others, relative to its
    share of a plain step (1 / rows of it). Alone: step_cost(1 + k) - 1. In a batch a guess
    costs far more than its share: on a 1B-class layer (Q4_K, 2 threads) a 2nd, 5th and 9th
    row add 19%, 37% and 22% to a step of 1, 4 and 8 rows, 0.19, 1.5 and 1.8 of a sequence's
    share; scaling by rows^1.5 gives 0.13, 1.0 and 2.9: near up to 4 rows, high past them (a
    busy batch does not guess)."""
    return (step_cost(1 + k) - 1) * rows ** 1.5


def expected_rate(alpha: float, k: int, rows: int = 1, per_guess: float = 0.0) -> float:
    """Tokens per unit of cost of a step guessing k tokens that each hold with probability
    alpha given the ones before held: (1 - alpha^(k+1)) / (1 - alpha) tokens for
    1 + guess_cost(k, rows) + per_guess * k (a plain step: 1 token for 1; per_guess: what
    making a guess costs, a draft model's step)."""
    return sum(alpha ** i for i in range(k + 1)) / (1 + guess_cost(k, rows) + per_guess * k)


def draft_length(alpha: float, most: int, rows: int = 1, per_guess: float = 0.0) -> int:
    """The k in 0..most that maximises expected tokens per step over its cost (expected_rate)."""
    best, best_rate = 0, 1.0
    for k in range(1, most + 1):
        rate = expected_rate(alpha, k, rows, per_guess)
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


def verify_sampled(sampler, draft: list[int], logits: torch.Tensor,
                   q: Optional[list[torch.Tensor]] = None) -> list[int]:
    """Speculative sampling of len(draft) + 1 rows of logits with the sequence's sampler (its
    RNG): the accepted draft tokens and one more. q: the distribution each draft token was
    drawn from (a draft model's), None for point masses (prompt lookup). Draft token d
    holds with probability min(1, p(d) / q(d)); else the token is drawn from
    max(0, p - q), renormalised. Each is recorded in the sampler as it is chosen, so that
    penalties follow them row by row as when sampling one at a time; their logprobs are the
    caller's to note, as it sends them."""
    out: list[int] = []
    for j, d in enumerate(draft):
        probs = sampler.distribution(logits[j])
        u = float(torch.rand((), generator=sampler.generator, device=probs.device))
        q_d = 1.0 if q is None else float(q[j][d])
        if u * q_d >= float(probs[d]):
            if q is None:
                probs[d] = 0  # the residual of a point mass: p without the draft token
            else:
                probs = (probs - q[j].to(probs.device)).clamp_(min=0)
            # an empty residual: p <= q everywhere, so p = q but for rounding: d holds
            if float(probs.sum()) > 0:
                out.append(sampler.draw(probs))
                sampler.record(out[-1])
                return out
        out.append(d)
        sampler.record(d)
    out.append(sampler.draw(sampler.distribution(logits[len(draft)])))
    sampler.record(out[-1])
    return out
