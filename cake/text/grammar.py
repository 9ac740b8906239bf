"""Grammar-constrained decoding (structured output, forced tool calls) with llguidance.

llguidance was chosen over xgrammar: one 3 MB wheel with no dependencies (xgrammar 0.2.8
pulls transformers and triton in at run time), it reads our `tokenizers` JSON directly, and a
token mask over SmolLM2's 49k vocabulary takes ~7-15 us, ~20 us as a bool tensor (the
first mask of a JSON schema ~2 ms).
A sequence's next mask is computed on a worker thread (llguidance drops the GIL) as soon as
its token is accepted, so it overlaps the next forward pass and one sequence's grammar does
not hold up the others in the batch.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

# Compact JSON with one space after separators: flexible whitespace lets a small model
# wander into endless newlines.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_masks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cake-grammar")


def closed(schema):
    """Objects that list their properties get no others unless the schema says so: any
    output is still valid, and a small model cannot pad an answer with keys of its own."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k not in ("const", "enum", "default", "examples") else v
           for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def styled(schema: dict) -> dict:
    return {**closed(schema), "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}


def json_schema_grammar(schema: dict) -> str:
    return LLMatcher.grammar_from_json_schema(styled(schema))


def json_object_grammar() -> str:
    return json_schema_grammar({"type": "object"})


def lark_json(schema: dict) -> str:
    """A JSON schema as a term inside a Lark grammar."""
    return "%json " + json.dumps(styled(schema))


def lark_grammar(lark: str) -> str:
    return LLMatcher.grammar_from_lark(lark)


def guidance_tokenizer(tokenizer, vocab_size: int) -> LLTokenizer:
    """The tokenizer as llguidance sees it (built once per model: ~0.3 s)."""
    cached = getattr(tokenizer, "_guidance", None)
    if cached is None or cached.vocab_size != vocab_size:
        cached = LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size,
                             eos_token=sorted(tokenizer.stop_ids))
        tokenizer._guidance = cached
    return cached


def check(grammar: str, tokenizer: LLTokenizer) -> Optional[str]:
    """An error message when the grammar (a schema, say) cannot be used, else None."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    return messages[0] if is_error else None


class Constraint:
    """One sequence's grammar state: which tokens may come next, and the tokens so far."""

    def __init__(self, grammar: str, tokenizer: LLTokenizer):
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        self.vocab_size = tokenizer.vocab_size
        self._next: Future = _masks.submit(self._compute)

    def _compute(self) -> torch.Tensor:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        # bit i of the little-endian words is token i; unpackbits is ~10x torch's shifts
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].view(np.bool_)
        return torch.from_numpy(allowed)

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar accepts next."""
        return self._next.result()

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"grammar refused token {token}: {self.matcher.get_error()}")
        self._next = _masks.submit(self._compute)  # once stopped: only the end token
