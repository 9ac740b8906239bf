"""A small draft model of the target's vocabulary that guesses each sequence's next tokens.

The draft runs as a LocalPipeline of its own whose KV pool has as many blocks, of the same
size, as the target's: a sequence's block table names its positions in both, so the engine's
BlockPool, prefix cache and copy-on-write forks serve the draft as they serve the target,
with no second cache scheme. seq.draft_cached counts the positions whose draft keys and
values hold (a prefix of the sequence); a rejected guess rolls it back to the tokens that
held, and whatever the draft wrote past it is rewritten before any later row reads it (a row
attends to positions up to its own, and a step feeds every position from draft_cached on).

Each step the sequences that guess with the model are fed in rounds, batched across them:
round 0 the tokens the draft has not seen (the newest, and any the target took without it),
then one row per sequence with the token drafted in the round before. A draft token is the
argmax for greedy sequences; sampled ones draw it from q, the draft's distribution under the
sequence's own sampler (penalties, temperature, top-k, top-p, min-p), and keep q for the
verification (speculative sampling, cake.text.speculation.verify_sampled).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from cake.text.kv_cache import StepBatch

log = logging.getLogger(__name__)

# Tokens behind the newest that round 0 feeds as rows of their own; a longer gap (a fresh
# prompt, a stretch decoded without the draft) is first computed as a prefill chunk.
CATCHUP_ROWS = 8
# Most positions of one sequence the draft catches up on in a step (a long prompt takes a few
# steps, as its prefill did). Per sequence, not per step: whether a sequence guesses in a step
# then depends on its own history alone, so a seeded request samples the same text alone or
# beside others.
CATCHUP_CHUNK = 256
# Any text: words, digits, punctuation, accents, CJK, an emoji, code, spaces and a newline.
SAMPLE_TEXT = ("Hello, world! The 3 quick brown foxes (naïve café, 東京, 🙂) jumped over "
               "2,048 lazy dogs.\n  def f(x): return x ** 2  # done")


class UnfitDraft(ValueError):
    """A draft model that cannot serve the model (said in one line)."""


def check_vocabulary(name: str, target_tokenizer, target_vocab: int, draft_tokenizer,
                     draft_vocab: int) -> None:
    """Raise UnfitDraft unless the draft scores the same tokens as the target:
    as many logits, and the same ids for a sample text."""
    if draft_vocab != target_vocab:
        raise UnfitDraft(f"draft model {name} has a vocabulary of {draft_vocab} tokens, the "
                         f"model {target_vocab}: they must share one")
    ours, theirs = target_tokenizer.encode(SAMPLE_TEXT), draft_tokenizer.encode(SAMPLE_TEXT)
    if ours != theirs or target_tokenizer.vocab_size != draft_tokenizer.vocab_size:
        raise UnfitDraft(f"draft model {name} tokenizes text differently from the model "
                         f"({len(theirs)} tokens for a sample the model makes {len(ours)}): "
                         "they must share one tokenizer")


def weight_bytes(stage) -> int:
    """Bytes of a stage's weights as held (quantized blocks at their packed size)."""
    return sum(size for _, _, size in stage.tensor_details().values())


class DraftModel:
    def __init__(self, name: str, pipeline, cost: float):
        """pipeline: a LocalPipeline with the target's number and size of blocks; cost: one
        step of it relative to one of the target (their weights' bytes: CPU decoding reads
        every weight once per step)."""
        self.name, self.pipeline, self.cost = name, pipeline, cost
        self.max_len = pipeline.max_len

    def describe(self) -> dict:
        """For the topology document."""
        stage = self.pipeline.stages[0]
        return {"model": self.name, "layers": stage.args.num_hidden_layers,
                "weight_bytes": weight_bytes(stage), "relative_cost": round(self.cost, 3),
                **self.pipeline.kv_cache_stats()}

    def kv_capacity_bytes(self) -> int:
        return self.pipeline.kv_cache_stats()["kv_cache_capacity_bytes"]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.pipeline.copy_blocks(pairs)

    def propose(self, seqs: list, ks: list[int]
                ) -> tuple[list[list[int]], list[Optional[list[torch.Tensor]]]]:
        """ks[i] draft tokens for each sequence (engine Sequences whose blocks reach the
        positions drafted), and for sampled ones the distribution each was drawn from (None
        for greedy: point masses). A sequence the draft is far behind is first caught up,
        CATCHUP_CHUNK positions a step: it guesses nothing until it is close."""
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[Optional[list[torch.Tensor]]] = [
            None if s.sampler.params.greedy else [] for s in seqs]
        feed: dict[int, list[tuple[int, int]]] = {}  # sequence -> (token, position) rows
        for i, (s, k) in enumerate(zip(seqs, ks)):
            start = s.draft_cached
            if s.length - start > CATCHUP_ROWS:
                self._prefill(s, start, min(s.length - 1, start + CATCHUP_CHUNK))
            if k > 0 and s.length - s.draft_cached <= CATCHUP_ROWS:
                tokens = s.tokens
                feed[i] = [(tokens[p], p) for p in range(s.draft_cached, s.length)]
        while feed:
            order = list(feed)
            rows = [r for i in order for r in feed[i]]
            device = self.pipeline.device
            tokens = torch.tensor([[t] for t, _ in rows], device=device)
            tables = [seqs[i].blocks for i in order for _ in feed[i]]
            batch = StepBatch.make([[p] for _, p in rows], tables, device)
            logits = self.pipeline.forward(tokens, batch,
                                           torch.zeros(len(rows), dtype=torch.long,
                                                       device=device))
            last, at = [], 0
            for i in order:
                at += len(feed[i])
                last.append(at - 1)
            chosen = self._choose([seqs[i] for i in order], logits[last])
            for i, (token, q) in zip(order, chosen):
                s = seqs[i]
                s.draft_cached = feed[i][-1][1] + 1
                drafts[i].append(token)
                if q is not None:
                    qs[i].append(q)
                if len(drafts[i]) < ks[i]:
                    feed[i] = [(token, s.length - 1 + len(drafts[i]))]
                else:
                    del feed[i]
        return drafts, qs

    @staticmethod
    def _choose(seqs: list, logits: torch.Tensor) -> list[tuple[int, Optional[torch.Tensor]]]:
        """Each sequence's draft token from its row of draft logits, and q where sampled:
        the sampler's distribution as it stands at the step's start (its penalties do not
        count the tokens drafted before in the step; verification is exact for any q, and
        this one differs from p's processing only there)."""
        samplers = [s.sampler for s in seqs]
        if all(s.plain_greedy for s in samplers):
            return [(t, None) for t in logits.argmax(-1).tolist()]
        out = []
        for sampler, row in zip(samplers, logits):
            if sampler.params.greedy:  # penalties or bias: their argmax, a point mass
                out.append((int(sampler.penalize(row).argmax()), None))
            else:
                q = sampler.distribution(row)
                out.append((sampler.draw(q), q))
        return out

    def _prefill(self, seq, start: int, end: int) -> None:
        """The draft's keys and values of the sequence's positions [start, end)."""
        device = self.pipeline.device
        tokens = torch.tensor([seq.tokens[start:end]], device=device)
        batch = StepBatch.make([list(range(start, end))], [seq.blocks], device)
        self.pipeline.forward(tokens, batch, torch.tensor([end - start - 1], device=device))
        seq.draft_cached = end
