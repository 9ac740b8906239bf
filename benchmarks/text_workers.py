"""One measured system per process, driven by text_bench.py over stdin/stdout (a JSON object
per line), so that the systems alternate within one run without sharing threads or memory.

    python benchmarks/text_workers.py cake|llamacpp MODEL.gguf --threads 2

Requests: {"op": "decode", "prompt": [ids], "tokens": N}: greedy, N new tokens whatever the
model says; tok/s over the N-1 tokens after the first (the first one ends prefill).
{"op": "prefill", "prompt": [ids]}: tok/s of processing the prompt (one token sampled after
it, for ours).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# llama_cpp.server without llama.cpp's extra buffer types (its AMX / repacked weight layouts).
# Where the CPU has AMX, ggml puts Q4_0/Q4_K/Q6_K/Q8_0 weights in its AMX buffer; on the VMs
# measured (2026-12-01: SIGILL; 2026-12-02, Xeon with amx_int8, which a plain AMX tile program
# runs fine: a general protection fault in libggml-cpu at the first token) that path dies, and
# llama-cpp-python can switch off only all extra buffer types (its CPU_REPACK too), not AMX
# alone. Without AMX (AMD EPYC, the 46-50 tok/s) CPU_REPACK is the default: run as shipped.
LLAMA_NO_EXTRA_BUFTS = f"""
import runpy, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from text_workers import without_extra_bufts
without_extra_bufts()
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def without_extra_bufts() -> None:
    """Models loaded by llama_cpp in this process from now on get no extra buffer types."""
    import llama_cpp.llama_cpp as api

    default = api.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    api.llama_model_default_params = params


class LlamaCpp:
    def __init__(self, model: str, threads: int, extra_bufts: bool = True):
        if not extra_bufts:
            without_extra_bufts()
        from llama_cpp import Llama

        self.llm = Llama(model, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                         n_batch=512, verbose=False)

    def decode(self, prompt: list[int], tokens: int) -> dict:
        self.llm.reset()
        n, start = 0, time.perf_counter()
        first = start
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if n == 1:
                first = time.perf_counter()
            if n == tokens:
                break
        end = time.perf_counter()
        return {"tok_s": (n - 1) / (end - first), "tokens": n, "ttft_s": first - start}

    def prefill(self, prompt: list[int]) -> dict:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        return {"tok_s": len(prompt) / (time.perf_counter() - start)}


class Cake:
    def __init__(self, model: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        from cake.text.serving import load_text_model

        self.model = load_text_model(model, "bench", device="cpu", max_batch=1)

    def _run(self, prompt: list[int], tokens: int) -> tuple[float, float, float, int]:
        import queue

        from cake.text.sampling import SamplingParams

        events: queue.Queue = queue.Queue()
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        self.model.engine.submit(prompt, params, lambda out: events.put((time.perf_counter(), out)))
        first = None
        while True:
            when, out = events.get(timeout=600)
            first = first or when
            if out.finished:
                if out.error:
                    raise RuntimeError(out.error)
                return start, first, when, out.completion_tokens

    def decode(self, prompt: list[int], tokens: int) -> dict:
        start, first, end, n = self._run(prompt, tokens)
        return {"tok_s": (n - 1) / (end - first), "tokens": n, "ttft_s": first - start}

    def prefill(self, prompt: list[int]) -> dict:
        start, _, end, _ = self._run(prompt, 1)
        return {"tok_s": len(prompt) / (end - start)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["cake", "llamacpp"])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp: see LlamaCpp")
    args = ap.parse_args()
    worker = Cake(args.model, args.threads) if args.system == "cake" else \
        LlamaCpp(args.model, args.threads, extra_bufts=not args.no_extra_bufts)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "decode":
            out = worker.decode(req["prompt"], req["tokens"])
        elif req["op"] == "prefill":
            out = worker.prefill(req["prompt"])
        else:
            break
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
