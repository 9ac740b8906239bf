"""The text engine: a scheduler thread that runs many sequences through one pipeline.

Each loop iteration (a step):
  1. drops cancelled sequences (a client that went away costs at most one step),
  2. admits waiting requests while the KV pool has blocks for their prompts, each mapping
     the longest prefix of its prompt that is cached already (kv_cache.BlockPool),
  3. prefills chunks of new sequences within a token budget that the decode rows share
     (long prompts never stall running streams),
  4. decodes one token for every running sequence in a single batched forward; a sequence
     that needs a block when none is left takes one from the newest sequence, which is
     preempted and computed again later (most of it from the prefix cache).
n answers to one prompt share its prefill: the others map the first one's blocks, copied
when first written (copy-on-write). Sequences join and leave between steps (continuous
batching). Results go back through a callback per request, so the engine knows nothing of
HTTP or asyncio.
"""
from __future__ import annotations

import ctypes
import gc
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cake.jobs import Job
from cake.text.kv_cache import BlockPool, StepBatch, block_hashes
from cake.text.pipeline import Pipeline
from cake.text.grammar import Constraint, guidance_tokenizer
from cake.text.sampling import Sampler, SamplingParams, sample_batch, token_logprobs
from cake.text.speculation import (MODEL_PRIOR_HOLDS, DraftRecord, PromptLookup, draft_length,
                                   expected_rate, verify_greedy, verify_sampled)
from cake.text.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer

log = logging.getLogger(__name__)


SPECULATE_UPTO = 8  # running sequences up to which decoding guesses ahead: past that, the
# batch's rows keep the matrix kernels busy and extra rows would cost about what they win


class QueueFull(RuntimeError):
    """More requests wait than the engine queues (max_queue): try again later."""


def return_free_memory() -> None:
    """Hand the memory that glibc's allocator holds but no longer uses back to the OS, so
    resident memory follows what is live (loading a GGUF frees ~150 MB of metadata objects)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


@dataclass
class Output:
    """One event for a request: new text, and on the last event why it finished."""

    text: str = ""
    finish_reason: Optional[str] = None  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: Optional[str] = None
    # (token, logprob, top [(token, logprob)]) of the tokens since the last event (logprobs)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: Optional[list] = None  # first event: the prompt's, first entry None
    embedding: Optional[list[float]] = None  # embed requests: the pooled hidden state

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Sequence(Job):
    """A text request as the engine runs it: a Job (cake/jobs.py) whose events are Outputs."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Output], None]  # (the Job interface)
    sampler: Sampler
    detok: IncrementalDetokenizer
    stops: StopMatcher
    max_new: int
    blocks: list[int] = field(default_factory=list)  # block table: position p in blocks[p // bs]
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks of its tokens
    num_registered: int = 0  # blocks[:num_registered] are in the prefix cache
    num_dropped: int = 0  # blocks[:num_dropped] left every layer's window and went back
    num_cached: int = 0  # positions whose keys and values are in the cache
    cached_tokens: int = 0  # prompt tokens mapped from the prefix cache when admitted
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    arrived: float = field(default_factory=time.monotonic)
    forks: list["Sequence"] = field(default_factory=list)  # n > 1: start from our prefill
    prompt_logprobs: Optional[int] = None  # top-k for every prompt token (echo), None: off
    pending_prompt_logprobs: Optional[list] = None
    embed: bool = False  # prefill only and answer the last token's final hidden state
    lookup: PromptLookup = field(default_factory=PromptLookup)  # drafts and their record
    draft_context: tuple = ()  # the n-gram the pending draft followed
    record: DraftRecord = field(default_factory=DraftRecord)  # the draft model's guesses
    draft_cached: int = 0  # positions whose draft-model keys and values hold
    draft_noted: int = 0  # blocks[:draft_noted] were checked for holding the draft's KV

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def prefill_target(self) -> int:
        """Positions to compute before decoding: the prompt, or after a preemption every
        token but the newest (which the next decode step feeds)."""
        return self.length - 1 if self.generated else len(self.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


class Engine:
    def __init__(self, pipeline: Pipeline, tokenizer: Tokenizer, vocab_size: int,
                 token_budget: int = 512, max_batch: int = 64, max_queue: int = 1024,
                 draft_tokens: int = 7, drafter=None, draft_min: int = 0):
        """token_budget: tokens one step computes at most (decode rows plus prefill chunks);
        max_batch: sequences running at most (the KV pool bounds them too); max_queue:
        requests waiting at most, beyond which submit raises QueueFull; draft_tokens: most
        tokens a sequence guesses ahead (0: no speculation); drafter: a DraftModel
        (cake/text/draft_model.py) guessing besides prompt lookup, at least draft_min tokens
        a step where it guesses."""
        self.pipeline, self.tokenizer, self.vocab_size = pipeline, tokenizer, vocab_size
        self.token_budget, self.max_batch, self.max_queue = token_budget, max_batch, max_queue
        # Drafts are extra rows of their sequence in one step, and forks share its prompt's
        # blocks: neither holds where recurrent layers keep one state per sequence.
        self.draft_tokens = draft_tokens if pipeline.state_is_kv else 0
        # Blocks behind this many positions are read by no layer again (every layer slides).
        self.window = pipeline.block_window if pipeline.state_is_kv else None
        self.pool = BlockPool(pipeline.num_blocks, pipeline.block_size)
        self.block_size = pipeline.block_size
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # (group, handle) of decode steps a multi-machine pipeline has not answered yet
        self._in_flight: deque = deque()
        # (sequence, output) pairs kept back while the next step goes out (_decode_in_flight)
        self._held: Optional[list] = None
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.tokens_generated = 0  # lifetime counters, for /health and metrics
        self.requests_finished = 0
        self.preemptions = 0
        self.rejected = 0  # requests turned away with the queue full
        self.drafted = self.draft_accepted = 0  # speculative tokens guessed, and confirmed
        self.drafter = drafter if self.draft_tokens else None
        self.draft_min = draft_min
        self.model_drafted = self.model_accepted = 0  # of those, the draft model's
        # All sequences' draft-model record: where a sequence's text does not depend on its
        # guesses (greedy, or unseeded), it starts from this one rather than the prior
        self.model_record = DraftRecord()
        # Prefix-cached blocks that hold the draft model's keys and values too (a block the
        # target filled while the draft lagged holds only the target's)
        self.draft_ready: set[int] = set()
        pipeline.attach(self)

    @property
    def max_len(self) -> int:
        return self.pipeline.max_len

    # -- public API (any thread) -------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_output: Callable[[Output], None], prompt_logprobs: Optional[int] = None,
               embed: bool = False) -> Sequence:
        """Queue a request. params.max_tokens must already fit the context.
        prompt_logprobs: also score the prompt's tokens (top-k each); embed: no generation,
        the answer is the last prompt token's final hidden state.
        Raises ValueError for a prompt that cannot fit, QueueFull when the queue is."""
        seq = self._sequence(prompt_ids, params, on_output)
        seq.prompt_logprobs, seq.embed = prompt_logprobs, embed
        self._enqueue([seq])
        return seq

    def submit_choices(self, prompt_ids: list[int], params: list[SamplingParams],
                       on_outputs: list[Callable[[Output], None]]) -> list[Sequence]:
        """len(params) answers to one prompt. Where the pipeline can copy blocks, the prompt
        is computed once and the others fork from it; else each is its own request."""
        seqs = [self._sequence(prompt_ids, p, cb) for p, cb in zip(params, on_outputs)]
        if len(seqs) > self.max_batch:
            raise ValueError(f"{len(seqs)} choices need more than the {self.max_batch} "
                             "sequences this server decodes together")
        if self.pipeline.can_copy_blocks and self.pipeline.state_is_kv:
            seqs[0].forks = seqs[1:]
            self._enqueue(seqs[:1])
        else:
            self._enqueue(seqs)
        return seqs

    def _sequence(self, prompt_ids, params, on_output) -> Sequence:
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_len}")
        room = self.pool.num_blocks * self.block_size  # positions the whole pool holds
        if len(prompt_ids) >= room:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the KV cache holds {room} "
                             "(see --kv-memory)")
        constraint = None
        if params.grammar is not None:
            constraint = Constraint(params.grammar,
                                    guidance_tokenizer(self.tokenizer, self.vocab_size))
        # a seeded sample's guesses must not depend on other requests' records
        reproducible = params.seed is not None and not params.greedy
        return Sequence(
            record=DraftRecord(MODEL_PRIOR_HOLDS if reproducible
                               else self.model_record.holds()),
            id=next(self._ids), prompt_ids=list(prompt_ids), params=params, on_event=on_output,
            sampler=Sampler(params, prompt_ids, self.vocab_size, device=self.pipeline.device,
                            constraint=constraint),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
            stops=StopMatcher(params.stop),
            max_new=min(params.max_tokens, self.max_len - len(prompt_ids),
                        room - len(prompt_ids)))

    def _enqueue(self, seqs: list[Sequence]) -> None:
        with self._wake:
            if len(self.waiting) + len(seqs) > self.max_queue:
                self.rejected += 1
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.extend(seqs)
            self._wake.notify()

    def start(self) -> None:
        # What exists now (model, tokenizer, modules) lives as long as the server: keep the
        # cyclic collector from re-scanning it, which cost ~8% of each decode step.
        gc.collect()
        return_free_memory()  # what loading freed (a GGUF reader's metadata: ~150 MB)
        gc.freeze()
        self._thread = threading.Thread(target=self._loop, name="cake-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=10)

    def stats(self) -> dict:
        kv = self.pipeline.kv_cache_stats()
        if self.drafter is not None:  # its pool: as many blocks, named by the same tables
            kv["kv_cache_capacity_bytes"] += self.drafter.kv_capacity_bytes()
        if "kv_cache_bytes" not in kv:  # what the live sequences' blocks take
            block = kv["kv_cache_capacity_bytes"] // max(1, self.pool.num_blocks)
            kv["kv_cache_bytes"] = self.pool.used() * block
        return {"waiting": len(self.waiting), "prefilling": len(self.prefilling),
                "running": len(self.running), "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished, "preemptions": self.preemptions,
                "rejected": self.rejected, "draft_tokens": self.drafted,
                "draft_tokens_accepted": self.draft_accepted, **self._draft_model_stats(),
                **self.pool.stats(), **kv}

    def _draft_model_stats(self) -> dict:
        if self.drafter is None:
            return {}
        return {"draft_model": self.drafter.name, "draft_model_tokens": self.model_drafted,
                "draft_model_tokens_accepted": self.model_accepted,
                "draft_model_kv_cache_capacity_bytes": self.drafter.kv_capacity_bytes(),
                "draft_model_acceptance": round(self.model_accepted / self.model_drafted, 4)
                if self.model_drafted else 0.0}

    # -- scheduler thread --------------------------------------------------------------

    def _loop(self) -> None:
        worked = True  # loading the model left freed memory behind too
        while True:
            with self._wake:
                while not self._stop and not (self.waiting or self.prefilling or self.running):
                    self._release_held()
                    if not self._wake.wait(timeout=1.0) and worked:
                        return_free_memory()  # idle for a second: a good time to tidy up
                        worked = False
                if self._stop:
                    self._release_held()
                    return
            worked = True
            try:
                self.step()
            except Exception:  # an engine failure ends every live request, not the server
                self._release_held()
                live = list(self.prefilling) + self.running
                log.exception("engine step failed (sequences %s)", [s.id for s in live])
                for seq in live:
                    self._finish(seq, "error", error="inference failed")

    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self.prefilling or not self.running:  # no decode step to send out ahead of them
            self._release_held()
        # Decode rows come first in the budget; prefill always gets a block's worth.
        budget = max(self.token_budget - len(self.running), self.block_size)
        for seq in list(self.prefilling):
            if budget <= 0:
                break
            budget -= self._prefill_chunk(seq, budget)
        if self.running:
            self._decode()

    def _drop_cancelled(self) -> None:
        with self._wake:
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, "cancelled")
        for seq in [s for s in list(self.prefilling) + self.running if s.cancelled]:
            self._finish(seq, "cancelled")

    # -- blocks ------------------------------------------------------------------------

    def _admit(self) -> None:
        """Waiting sequences, oldest first, while the pool has blocks for what they prefill
        (keeping one block per running sequence for its next tokens)."""
        with self._wake:
            while self.waiting:
                seq = self.waiting[0]
                live = len(self.running) + len(self.prefilling)
                if live and live + 1 + len(seq.forks) > self.max_batch:
                    return
                target, bs = seq.prefill_target, self.block_size
                found = []
                if self._reuses_prefix(seq):
                    tokens = seq.tokens
                    block_hashes(tokens[:target], bs, seq.hashes)
                    # at least one token is computed: its logits are the first answer
                    found = self.pool.lookup(seq.hashes[:(target - 1) // bs])
                need = -(-target // bs) - len(found)
                if need + len(self.running) > self.pool.available() and live:
                    for b in found:
                        self.pool.release(b)
                    return
                self.waiting.popleft()
                seq.blocks = found + [self.pool.allocate() for _ in range(need)]
                seq.num_registered = len(found)
                seq.num_cached = len(found) * bs
                if self.drafter is not None:
                    ready = next((i for i, b in enumerate(found) if b not in self.draft_ready),
                                 len(found))
                    seq.draft_cached, seq.draft_noted = ready * bs, ready
                if not seq.generated:  # a first admission, not a resumption
                    seq.cached_tokens = seq.num_cached
                    if self._reuses_prefix(seq):
                        self.pool.queried_tokens += len(seq.prompt_ids)
                        self.pool.hit_tokens += seq.num_cached
                self.prefilling.append(seq)

    def _reuses_prefix(self, seq: Sequence) -> bool:
        # prompt logprobs need logits at every prompt position: those are computed
        return self.pipeline.prefix_reusable and seq.prompt_logprobs is None

    def _register(self, seq: Sequence) -> None:
        """Offer the sequence's newly filled blocks to the prefix cache, and give back those
        that left the window of every layer."""
        full = seq.num_cached // self.block_size
        if full > seq.num_registered and self.pipeline.prefix_reusable:
            block_hashes(seq.tokens[:full * self.block_size], self.block_size, seq.hashes)
            for i in range(seq.num_registered, full):
                self.pool.register(seq.blocks[i], seq.hashes[i])
                self.draft_ready.discard(seq.blocks[i])  # until the draft has filled it too
            seq.num_registered = full
        if self.drafter is not None:
            self._note_draft(seq)
        if self.window is not None:
            self._drop_behind_window(seq)

    def _note_draft(self, seq: Sequence) -> None:
        """Mark the sequence's registered blocks that hold the draft model's keys and values
        too (a block it maps from the prefix cache spares the draft computing it again)."""
        upto = min(seq.num_registered, seq.draft_cached // self.block_size)
        for i in range(seq.draft_noted, upto):
            self.draft_ready.add(seq.blocks[i])
        seq.draft_noted = max(seq.draft_noted, upto)

    def _drop_behind_window(self, seq: Sequence) -> None:
        """The next position computed (num_cached) and every later one attend to positions
        > num_cached - window: a block wholly at or before that is read no more. Its table
        entry becomes block 0, which the masks keep out of every read."""
        behind = (seq.num_cached - self.window + 1) // self.block_size
        for i in range(seq.num_dropped, min(behind, len(seq.blocks))):
            if self.pool.release(seq.blocks[i]):
                self.pipeline.release(seq.blocks[i])
            seq.blocks[i] = 0
        seq.num_dropped = max(seq.num_dropped, min(behind, len(seq.blocks)))

    def _release_blocks(self, seq: Sequence) -> None:
        for b in seq.blocks[seq.num_dropped:]:
            if self.pool.release(b):
                self.pipeline.release(b)
        seq.blocks, seq.num_cached, seq.num_registered, seq.num_dropped = [], 0, 0, 0
        seq.draft_cached = seq.draft_noted = 0

    # -- what a pipeline asks of the engine after it lost a stage's cache ----------------

    def live_kv(self) -> list[tuple[list[int], list[int]]]:
        """(tokens whose keys and values are cached, block table) of every sequence holding
        blocks: what a pipeline recomputes into a stage that lost its cache."""
        return [(s.tokens[:s.num_cached], list(s.blocks))
                for s in list(self.prefilling) + self.running
                if s.blocks and s.num_cached and not s.done]

    def forget_prefix_cache(self) -> None:
        """Cached blocks nobody references are gone on some stage: drop them."""
        for b in self.pool.forget_cached():
            self.pipeline.release(b)

    def _writable(self, seq: Sequence, position: int) -> bool:
        """Make the block of `position` the sequence's own (a new block, or a copy of one it
        shares with a fork); False when the pool has no block to give."""
        i = position // self.block_size
        if i < len(seq.blocks) and self.pool.refs[seq.blocks[i]] == 1:
            return True
        if not self.pool.available():
            return False
        block = self.pool.allocate()
        if i < len(seq.blocks):  # copy on write
            old = seq.blocks[i]
            self.pipeline.copy_blocks([(old, block)])
            if self.drafter is not None:
                self.drafter.copy_blocks([(old, block)])
            self.pool.release(old)
            seq.blocks[i] = block
        else:
            seq.blocks.append(block)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Give back a sequence's blocks and queue it first, to compute again later (what
        it had filled is offered to the prefix cache, so much of it may still be there)."""
        log.info("preempting sequence %d at %d tokens: the KV pool is full", seq.id, seq.length)
        self.preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self._release_blocks(seq)
        with self._wake:
            self.waiting.appendleft(seq)

    def _room_for(self, seqs: list[Sequence], busy: frozenset = frozenset()
                  ) -> list[Sequence]:
        """The sequences (oldest first) whose next position has a block; the newest
        sequences give theirs up when the pool runs dry. busy: ids of sequences whose step is
        out on the ring; such a step still writes its blocks, so when the newest is one of
        them the sequence that needs room sits this step out instead."""
        ready = []
        for seq in sorted(seqs, key=lambda s: s.id):
            while not seq.done and seq in self.running and not self._writable(seq, seq.length - 1):
                victims = [s for s in self.running + list(self.prefilling)
                           if s.blocks and not s.done and s not in ready]
                victim = max(victims, key=lambda s: s.id)
                if victim.id in busy:
                    break
                self._preempt(victim)
            else:  # (no break) it has its block, or it was the one preempted
                if seq in self.running and not seq.done:
                    ready.append(seq)
        return ready

    # -- forwards ----------------------------------------------------------------------

    def _prefill_chunk(self, seq: Sequence, limit: int) -> int:
        """Compute up to `limit` more positions of a sequence's prefill; returns how many."""
        start, target = seq.num_cached, seq.prefill_target
        end = min(target, start + limit)
        device = self.pipeline.device
        tokens = torch.tensor([seq.tokens[start:end]], device=device)
        batch = StepBatch.make([list(range(start, end))], [seq.blocks], device)
        last = torch.tensor([end - start - 1], device=device)
        done = end == target
        if seq.embed and done:
            hidden = self.pipeline.hidden(tokens, batch, last)
            seq.num_cached = end
            self._finish(seq, "stop", embedding=hidden[0].float().tolist())
            return end - start
        if seq.prompt_logprobs is not None:
            logits = self._score_prompt(seq, tokens, batch, start, end)
        else:
            logits = self.pipeline.forward(tokens, batch, last)
        seq.num_cached = end
        self._register(seq)
        if not done:
            return end - start
        self.prefilling.remove(seq)
        if seq.generated:  # resumed after a preemption: the next decode feeds its newest token
            self.running.append(seq)
            return end - start
        forks, seq.forks = seq.forks, []
        for f in [f for f in forks if f.cancelled]:
            self._finish(f, "cancelled")
        forks = [f for f in forks if not f.done]
        for f in forks:  # the prompt's blocks, shared until one of them writes
            for b in seq.blocks[seq.num_dropped:]:
                self.pool.share(b)
            f.blocks, f.hashes = list(seq.blocks), list(seq.hashes)
            f.num_cached, f.num_registered = end, seq.num_registered
            f.num_dropped = seq.num_dropped
            f.cached_tokens = seq.cached_tokens
            f.draft_cached, f.draft_noted = seq.draft_cached, seq.draft_noted
        for s in [seq, *forks]:
            if s.max_new == 0:  # scoring only (completions' echo with max_tokens 0)
                self._finish(s, "length")
            else:
                self.running.append(s)
        live = [s for s in (seq, *forks) if not s.done]
        if live:
            self._sample(live, logits.expand(len(live), -1))
        return end - start

    def _score_prompt(self, seq: Sequence, tokens, batch, start: int, end: int):
        """Logits at every position of the chunk: each scores the prompt token after it."""
        logits = self.pipeline.forward(tokens, batch, None)[0]
        entries = seq.pending_prompt_logprobs
        if entries is None:
            entries = seq.pending_prompt_logprobs = [None]  # nothing predicts the first token
        for i in range(end - start):
            if start + i + 1 < len(seq.prompt_ids):
                entries.append(token_logprobs(logits[i], seq.prompt_ids[start + i + 1],
                                              seq.prompt_logprobs))
        return logits[-1:]

    def _decode_inputs(self, seqs: list[Sequence], drafts: Optional[list[list[int]]] = None):
        """The newest token of each sequence (not yet in the cache) and then its draft, one
        row per token, each at its position in the sequence's blocks: a draft is verified by
        the same single-token rows as a plain decode, in the same forward."""
        device = self.pipeline.device
        drafts = drafts or [[] for _ in seqs]
        feed = [[s.generated[-1], *d] for s, d in zip(seqs, drafts)]
        tokens = torch.tensor([[t] for f in feed for t in f], device=device)
        positions = [[s.length - 1 + j] for s, f in zip(seqs, feed) for j in range(len(f))]
        tables = [s.blocks for s, f in zip(seqs, feed) for _ in f]
        batch = StepBatch.make(positions, tables, device)
        return tokens, batch, torch.zeros(len(positions), dtype=torch.long, device=device)

    def _decoded(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        for s in seqs:
            s.num_cached = s.length
            self._register(s)
        self._sample(seqs, logits)

    def _decode(self) -> None:
        if self._in_flight or self.pipeline.depth > 1:
            return self._decode_in_flight()
        seqs = self._room_for([s for s in self.running if not s.done])
        if seqs:
            guesses, qs = self._guesses(seqs)
            self._take(seqs, guesses, qs,
                       self.pipeline.forward(*self._decode_inputs(seqs, guesses)))

    def _guesses(self, seqs: list[Sequence]) -> tuple[list[list[int]], dict]:
        """Each sequence's draft for a step of `seqs` ([]: none), and {id: q} of those the
        draft model made (see _drafts). Past SPECULATE_UPTO sequences only seeded ones guess."""
        few = len(seqs) <= SPECULATE_UPTO
        drafts, qs = self._drafts([s for s in seqs if few or s.params.seed is not None],
                                  len(seqs))
        return [drafts.get(s.id, []) for s in seqs], qs

    def _take(self, seqs: list[Sequence], guesses: list[list[int]], qs: dict,
              logits: torch.Tensor) -> None:
        """A step's logits: 1 + len(guess) rows per sequence, in order. Sequences that
        finished while their step was in flight are skipped."""
        rows, plain, at = 0, [], []
        for s, d in zip(seqs, guesses):
            if s.done:
                pass
            elif d:
                self._verify(s, d, logits[rows:rows + 1 + len(d)], s.id in qs, qs.get(s.id))
            else:
                plain.append(s)
                at.append(rows)
            rows += 1 + len(d)
        if plain:  # the rest sample together
            self._decoded(plain, logits if len(at) == rows else logits[at])

    def _drafts(self, seqs: list[Sequence], rows: int) -> tuple[dict, dict]:
        """{sequence id: its draft} of those that guess this step, and {id: q} of those
        whose draft the draft model made (q: the distributions its tokens were drawn from,
        None for greedy's point masses); rows: the sequences the step decodes."""
        drafts, by_model = {}, []
        for s in seqs:
            # a seeded sampled text must not depend on its company: it bets as if alone
            draft, k = self._draft(s, 1 if s.params.seed is not None else rows)
            if draft:
                drafts[s.id] = draft
            if k:
                by_model.append((s, k))
            elif self.drafter is not None:
                s.record.idle()
        if not by_model:
            return drafts, {}
        guessed, qs = self.drafter.propose([s for s, _ in by_model], [k for _, k in by_model])
        for (s, _), draft in zip(by_model, guessed):
            if draft:
                drafts[s.id] = draft
        return drafts, {s.id: q for (s, _), q, d in zip(by_model, qs, guessed) if d}

    def _draft(self, seq: Sequence, rows: int) -> tuple[list[int], int]:
        """A draft from prompt lookup (cake.text.speculation): the tokens that followed the
        longest suffix of the sequence seen before, as many as its record says pay; or the
        number of tokens the draft model is to guess, where its record promises more for the
        cost (in a step of `rows` sequences). ([], 0): no guess. Only as far as the pool has
        blocks for. A seeded sampled sequence guesses whatever the batch (the seed's text then
        does not depend on the company it runs in); a grammar's state is not for guessing
        ahead."""
        most = min(self.draft_tokens, seq.max_new - len(seq.generated) - 1,
                   self.max_len - seq.length - 1)
        if most <= 0 or seq.params.grammar is not None:
            return [], 0
        draft, seq.draft_context = seq.lookup.propose(seq.tokens, most, rows)
        k = 0
        if self.drafter is not None:
            alpha, cost = seq.record.holds(), self.drafter.cost
            room = min(most, self.drafter.max_len - seq.length)
            k = max(min(self.draft_min, room), draft_length(alpha, room, rows, cost))
            if k and draft and expected_rate(alpha, k, rows, cost) < expected_rate(
                    seq.lookup.holds(seq.draft_context), len(draft), rows):
                k = 0  # the copy promises more
            if k:
                draft = []
        for j in range(max(len(draft), k)):  # positions the pool has no block for: no guess
            if not self._writable(seq, seq.length + j):
                return draft[:j], min(k, j)
        return draft, k

    def _verify(self, seq: Sequence, draft: list[int], logits: torch.Tensor,
                by_model: bool = False, q: Optional[list[torch.Tensor]] = None) -> None:
        """Row j's logits follow draft[:j]. Greedy: the draft holds while the argmax agrees,
        exactly what decoding one token at a time gives; sampled: speculative sampling, the
        same distribution as sampling one at a time. by_model: the draft model made the draft
        (else prompt lookup); q: the distributions its tokens were drawn from (None: point
        masses, prompt lookup's or a greedy draft model's)."""
        if seq.sampler.plain_greedy:
            tokens = verify_greedy(logits.argmax(-1).tolist(), draft)
            for token in tokens:
                seq.sampler.record(token)
        else:
            try:
                tokens = verify_sampled(seq.sampler, draft, logits, q)
            except Exception:
                log.exception("sampling failed for sequence %d", seq.id)
                self._finish(seq, "error", error="sampling failed")
                return
        held = len(tokens) - 1
        if not by_model:
            seq.lookup.observe(seq.draft_context, len(draft), held)
        else:
            seq.record.observe(len(draft), held)
            self.model_record.observe(len(draft), held)
            self.model_drafted += len(draft)
            self.model_accepted += held
        self.drafted += len(draft)
        self.draft_accepted += held
        seq.num_cached = seq.length + held  # the rows fed after a wrong guess are void
        # the draft model's too: it holds the positions whose tokens held
        seq.draft_cached = min(seq.draft_cached, seq.num_cached)
        top = seq.params.logprobs
        for token, row in zip(tokens, logits):
            if top is not None:  # noted as each is sent: the tokens after an end get none
                seq.sampler.logprobs.append(token_logprobs(row, token, top))
            self._accept(seq, token)
            if seq.done:
                return
        self._register(seq)

    def _decode_in_flight(self) -> None:
        """Stages on several machines: split the running sequences into pipeline.depth groups
        and keep each group's next step in flight while the others compute, so that no stage
        waits idle; each call takes back one group's logits. A group guesses ahead as a local
        step does, its draft verified in the same round trip."""
        depth = self.pipeline.depth
        live = [s for s in self.running if not s.done]
        busy = frozenset(s.id for group, *_ in self._in_flight for s in group)
        idle = self._room_for([s for s in live if s.id not in busy], busy)
        size = -(-len(live) // max(1, depth))
        while idle and depth > 1 and len(self._in_flight) < depth:
            group, idle = idle[:size], idle[size:]
            guesses, qs = self._guesses(group)
            handle = self.pipeline.submit(*self._decode_inputs(group, guesses))
            self._in_flight.append((group, guesses, qs, handle))
        # The last step's text goes to its clients only now, while the stages compute: waking
        # the server's event loop (a context switch and the GIL's hand-over on the master's
        # core) then no longer delays the step being sent.
        self._release_held()
        if self._in_flight:
            group, guesses, qs, handle = self._in_flight.popleft()
            logits = self.pipeline.collect(handle)
            self._held = []
            self._take(group, guesses, qs, logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        samplers = [s.sampler for s in seqs]
        if all(s.plain_greedy for s in samplers):
            tokens = sample_batch(samplers, logits)
        else:  # row by row: one bad row (non-finite logits, a grammar refusal) fails alone
            tokens = [self._sample_row(seq, row) for seq, row in zip(seqs, logits)]
        for seq, token in zip(seqs, tokens):
            if token is not None:
                self._accept(seq, token)

    def _sample_row(self, seq: Sequence, logits: torch.Tensor) -> Optional[int]:
        try:
            return seq.sampler.sample(logits)
        except Exception:
            log.exception("sampling failed for sequence %d", seq.id)
            self._finish(seq, "error", error="sampling failed")
            return None

    def _accept(self, seq: Sequence, token: int) -> None:
        """Record a sampled token, send the text it completes, and finish if it ends."""
        seq.generated.append(token)
        self.tokens_generated += 1
        if token in self.tokenizer.stop_ids and not seq.params.ignore_eos:
            if seq.sampler.logprobs:  # the end token is no part of the answer's text
                seq.sampler.logprobs.pop()
            self._finish(seq, "stop", text=self._rest(seq))
            return
        text, stopped = seq.stops.feed(seq.detok.add(token))
        if stopped:
            self._finish(seq, "stop", text=text)
        elif len(seq.generated) >= seq.max_new or seq.length >= self.max_len:
            self._finish(seq, "length", text=text + self._rest(seq))
        elif text:
            self._emit(seq, Output(text=text))

    @staticmethod
    def _rest(seq: Sequence) -> str:
        """Text still held back at the end: an unfinished character, a possible stop prefix."""
        text, stopped = seq.stops.feed(seq.detok.flush())
        return text if stopped else text + seq.stops.flush()

    def _emit(self, seq: Sequence, out: Output) -> None:
        out.logprobs, seq.sampler.logprobs = seq.sampler.logprobs, []
        out.prompt_logprobs, seq.pending_prompt_logprobs = seq.pending_prompt_logprobs, None
        if self._held is not None:
            self._held.append((seq, out))
        else:
            self._deliver(seq, out)

    def _release_held(self) -> None:
        held, self._held = self._held, None
        for seq, out in held or ():
            self._deliver(seq, out)

    def _deliver(self, seq: Sequence, out: Output) -> None:
        try:
            seq.emit(out)
        except Exception:  # the receiver is gone (its event loop closed): stop generating
            log.warning("dropping output of sequence %d: receiver failed", seq.id, exc_info=True)
            seq.cancelled = True

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None,
                embedding: Optional[list[float]] = None):
        if seq.done:
            return
        seq.done = True
        for fork in seq.forks:  # forks that never started end with the sequence they wait on
            self._finish(fork, reason, error=error)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self._release_blocks(seq)
        self.requests_finished += 1
        self._emit(seq, Output(text=text, finish_reason=reason, error=error,
                               prompt_tokens=len(seq.prompt_ids),
                               completion_tokens=len(seq.generated),
                               cached_tokens=seq.cached_tokens, embedding=embedding))
