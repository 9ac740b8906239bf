"""The text engine: a scheduler thread that runs many sequences through one pipeline.

Each loop iteration:
  1. drops cancelled sequences (a client that went away costs at most one step),
  2. admits waiting requests into free KV slots,
  3. prefills one chunk of one new sequence (long prompts do not stall running streams),
  4. decodes one token for every running sequence in a single batched step.
n answers to one prompt share its prefill: the others copy the first one's cache (forks).
Sequences join and leave between steps (continuous batching). Results go back through a
callback per request, so the engine knows nothing of HTTP or asyncio.
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
from cake.text.kv_cache import StepBatch
from cake.text.pipeline import Pipeline
from cake.text.grammar import Constraint, guidance_tokenizer
from cake.text.sampling import Sampler, SamplingParams, sample_batch, token_logprobs
from cake.text.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer

log = logging.getLogger(__name__)


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
    slot: int = -1
    num_cached: int = 0  # prompt tokens already in the KV cache
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    arrived: float = field(default_factory=time.monotonic)
    forks: list["Sequence"] = field(default_factory=list)  # n > 1: start from our prefill
    prompt_logprobs: Optional[int] = None  # top-k for every prompt token (echo), None: off
    pending_prompt_logprobs: Optional[list] = None
    embed: bool = False  # prefill only and answer the last token's final hidden state

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


class Engine:
    def __init__(self, pipeline: Pipeline, tokenizer: Tokenizer, vocab_size: int,
                 prefill_chunk: int = 512):
        self.pipeline, self.tokenizer, self.vocab_size = pipeline, tokenizer, vocab_size
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # (group, handle) of decode steps a multi-machine pipeline has not answered yet
        self._in_flight: deque = deque()
        self.free_slots = list(range(pipeline.num_slots))
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.tokens_generated = 0  # lifetime counters, for /health and metrics
        self.requests_finished = 0

    @property
    def max_len(self) -> int:
        return self.pipeline.max_len

    # -- public API (any thread) -------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_output: Callable[[Output], None], prompt_logprobs: Optional[int] = None,
               embed: bool = False) -> Sequence:
        """Queue a request. params.max_tokens must already fit the context.
        prompt_logprobs: also score the prompt's tokens (top-k each); embed: no generation,
        the answer is the last prompt token's final hidden state."""
        seq = self._sequence(prompt_ids, params, on_output)
        seq.prompt_logprobs, seq.embed = prompt_logprobs, embed
        self._enqueue(seq)
        return seq

    def submit_choices(self, prompt_ids: list[int], params: list[SamplingParams],
                       on_outputs: list[Callable[[Output], None]]) -> list[Sequence]:
        """len(params) answers to one prompt. Where the pipeline can copy a slot's cache, the
        prompt is computed once and the others fork from it; else each is its own request."""
        seqs = [self._sequence(prompt_ids, p, cb) for p, cb in zip(params, on_outputs)]
        if len(seqs) > self.pipeline.num_slots:
            raise ValueError(f"{len(seqs)} choices need more than the {self.pipeline.num_slots} "
                             "sequences this server decodes together")
        if hasattr(self.pipeline, "fork"):
            seqs[0].forks = seqs[1:]
            self._enqueue(seqs[0])
        else:
            for seq in seqs:
                self._enqueue(seq)
        return seqs

    def _sequence(self, prompt_ids, params, on_output) -> Sequence:
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_len}")
        constraint = None
        if params.grammar is not None:
            constraint = Constraint(params.grammar,
                                    guidance_tokenizer(self.tokenizer, self.vocab_size))
        return Sequence(
            id=next(self._ids), prompt_ids=list(prompt_ids), params=params, on_event=on_output,
            sampler=Sampler(params, prompt_ids, self.vocab_size, device=self.pipeline.device,
                            constraint=constraint),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
            stops=StopMatcher(params.stop),
            max_new=min(params.max_tokens, self.max_len - len(prompt_ids)))

    def _enqueue(self, seq: Sequence) -> None:
        with self._wake:
            self.waiting.append(seq)
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
        return {"waiting": len(self.waiting), "prefilling": len(self.prefilling),
                "running": len(self.running), "free_slots": len(self.free_slots),
                "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished,
                **self.pipeline.kv_cache_stats()}

    # -- scheduler thread --------------------------------------------------------------

    def _loop(self) -> None:
        worked = True  # loading the model left freed memory behind too
        while True:
            with self._wake:
                while not self._stop and not (self.waiting or self.prefilling or self.running):
                    if not self._wake.wait(timeout=1.0) and worked:
                        return_free_memory()  # idle for a second: a good time to tidy up
                        worked = False
                if self._stop:
                    return
            worked = True
            try:
                self.step()
            except Exception:  # an engine failure ends every live request, not the server
                live = list(self.prefilling) + self.running
                log.exception("engine step failed (sequences %s)", [s.id for s in live])
                for seq in live:
                    self._finish(seq, "error", error="inference failed")

    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self.prefilling:
            self._prefill_chunk(self.prefilling[0])
        if self.running:
            self._decode()

    def _drop_cancelled(self) -> None:
        with self._wake:
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, "cancelled")
        for seq in [s for s in list(self.prefilling) + self.running if s.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        with self._wake:
            while self.waiting and len(self.free_slots) > len(self.waiting[0].forks):
                seq = self.waiting.popleft()
                for s in [seq, *seq.forks]:
                    s.slot = self.free_slots.pop(0)
                self.prefilling.append(seq)

    def _prefill_chunk(self, seq: Sequence) -> None:
        start = seq.num_cached
        end = min(len(seq.prompt_ids), start + self.prefill_chunk)
        device = self.pipeline.device
        tokens = torch.tensor([seq.prompt_ids[start:end]], device=device)
        batch = StepBatch.make([list(range(start, end))], [seq.slot], device)
        last = torch.tensor([end - start - 1], device=device)
        done = end == len(seq.prompt_ids)
        if seq.embed and done:
            hidden = self.pipeline.hidden(tokens, batch, last)
            seq.num_cached = end
            return self._finish(seq, "stop", embedding=hidden[0].float().tolist())
        if seq.prompt_logprobs is not None:
            logits = self._score_prompt(seq, tokens, batch, start, end)
        else:
            logits = self.pipeline.forward(tokens, batch, last)
        seq.num_cached = end
        if done:
            self.prefilling.popleft()
            forks, seq.forks = seq.forks, []
            for f in [f for f in forks if f.cancelled]:
                self._finish(f, "cancelled")
            forks = [f for f in forks if not f.done]
            for f in forks:
                self.pipeline.fork(seq.slot, f.slot, end)
                f.num_cached = end
            for s in [seq, *forks]:
                if s.max_new == 0:  # scoring only (completions' echo with max_tokens 0)
                    self._finish(s, "length")
                else:
                    self.running.append(s)
            live = [s for s in (seq, *forks) if not s.done]
            if live:
                self._sample(live, logits.expand(len(live), -1))

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

    def _decode(self) -> None:
        if self._in_flight or getattr(self.pipeline, "depth", 1) > 1:
            return self._decode_in_flight()
        seqs = [s for s in self.running if not s.done]
        device = self.pipeline.device
        # The newest token of each sequence is not yet in the cache: feed it now.
        tokens = torch.tensor([[s.generated[-1]] for s in seqs], device=device)
        batch = StepBatch.make([[s.length - 1] for s in seqs], [s.slot for s in seqs], device)
        logits = self.pipeline.forward(tokens, batch, torch.zeros(len(seqs), dtype=torch.long,
                                                                  device=device))
        self._sample(seqs, logits)

    def _decode_in_flight(self) -> None:
        """Stages on several machines: split the running sequences into pipeline.depth groups
        and keep each group's next step in flight while the others compute, so that no stage
        waits idle; each call takes back one group's logits."""
        depth = getattr(self.pipeline, "depth", 1)
        live = [s for s in self.running if not s.done]
        busy = {s.id for group, _ in self._in_flight for s in group}
        idle = [s for s in live if s.id not in busy]
        size = -(-len(live) // max(1, depth))
        device = self.pipeline.device
        while idle and depth > 1 and len(self._in_flight) < depth:
            group, idle = idle[:size], idle[size:]
            tokens = torch.tensor([[s.generated[-1]] for s in group], device=device)
            batch = StepBatch.make([[s.length - 1] for s in group], [s.slot for s in group],
                                   device)
            handle = self.pipeline.submit(tokens, batch, torch.zeros(len(group), dtype=torch.long,
                                                                     device=device))
            self._in_flight.append((group, handle))
        if self._in_flight:
            group, handle = self._in_flight.popleft()
            logits = self.pipeline.collect(handle)
            rows = [i for i, s in enumerate(group) if not s.done]  # some finished meanwhile
            if rows:
                self._sample([group[i] for i in rows], logits[rows])

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
        if seq.slot >= 0:
            self.pipeline.release(seq.slot)
            self.free_slots.append(seq.slot)
            seq.slot = -1
        self.requests_finished += 1
        self._emit(seq, Output(text=text, finish_reason=reason, error=error,
                               prompt_tokens=len(seq.prompt_ids),
                               completion_tokens=len(seq.generated), embedding=embedding))
