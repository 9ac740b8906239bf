"""Decode speed of every model family on the fast CPU path, against a Llama of the same shape.

    python benchmarks/bench_families.py [--qtype q4_0|q8_0] [--layers 8] [--hidden 1024]

Each family is built at the same shape with random weights (no download), quantized through
cake's own quantization path (load_stage(quant_mode=...)), and decoded greedily with batch 1:
tok/s over the steps after a short prefill, the median of a few runs; the families alternate
within the run so the shared machine's load hits them alike. The goal: each family within
10% of the Llama.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from cake.text.kv_cache import KVCache, StepBatch
from cake.text.loader import load_stage
from cake.text.models import model_class
from cake.text.models.args import ModelArgs
from cake.text.weights import TensorInfo


def configs(hidden: int, layers: int, ffn: int, heads: int, kv: int, vocab: int) -> dict:
    base = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=hidden // heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=True)
    return {
        "llama": {**base, "model_type": "llama"},
        "gemma3": {**base, "model_type": "gemma3_text", "sliding_window": 512,
                   "query_pre_attn_scalar": hidden // heads, "rope_local_base_freq": 10000.0,
                   "rope_theta": 1e6},
        # Phi-4-mini's kind: partial rotary 0.75, longrope
        "phi3": {**base, "model_type": "phi3", "partial_rotary_factor": 0.75,
                 "original_max_position_embeddings": 1024,
                 "rope_scaling": {"rope_type": "longrope",
                                  "short_factor": [1.0] * (3 * hidden // heads // 8),
                                  "long_factor": [2.0] * (3 * hidden // heads // 8)}},
        "olmo2": {**base, "model_type": "olmo2"},
        "exaone4": {**base, "model_type": "exaone4", "sliding_window": 512,
                    "sliding_window_pattern": 4},
        "smollm3": {**base, "model_type": "smollm3"},
    }


class RandomCheckpoint:
    """A checkpoint of random weights for a config: norms near 1, matrices small."""

    def __init__(self, config: dict, seed: int = 0):
        self.config = config
        with torch.device("meta"):
            model = model_class(config)(ModelArgs.from_config(config))
        self.shapes = {model.checkpoint_name(n): s for n, s in model._shapes.items()}
        self.gen = torch.Generator().manual_seed(seed)

    def tensor_names(self) -> list[str]:
        return list(self.shapes)

    def tensor_info(self) -> dict:
        return {n: TensorInfo(tuple(s), "F32", 4 * math.prod(s)) for n, s in self.shapes.items()}

    def raw(self, name: str) -> None:
        return None

    def files(self) -> list:
        return []  # made here: no file holds them

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return 1 + 0.1 * torch.randn(shape, generator=self.gen)
        return 0.02 * torch.randn(shape, generator=self.gen)


@torch.inference_mode()
def decode_tok_s(model, prompt_len: int, steps: int, clock=time.perf_counter) -> float:
    a = model.args
    cache = KVCache(range(a.num_hidden_layers), 1, prompt_len + steps + 1,
                    a.num_key_value_heads, a.head_dim, torch.float16, "cpu")
    tokens = torch.randint(0, a.vocab_size, (1, prompt_len), generator=torch.Generator()
                           .manual_seed(1))
    logits = model(tokens, StepBatch.make([list(range(prompt_len))], [0], "cpu"), cache,
                   logits_at=torch.tensor([prompt_len - 1]))
    start = clock()
    for i in range(steps):
        nxt = logits.argmax(-1).view(1, 1)
        pos = prompt_len + i
        logits = model(nxt, StepBatch.make([[pos]], [0], "cpu"), cache)[:, -1]
    return steps / (clock() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtype", default="q4_0", choices=["q4_0", "q4_1", "q8_0"])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--families", default="llama,gemma3,phi3,olmo2,exaone4,smollm3")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by this process's CPU time (with --threads 1: robust to other "
                         "jobs on shared cores, which wall time measures more than the model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    cfgs = configs(args.hidden, args.layers, args.ffn, args.heads, args.kv_heads, args.vocab)
    names = args.families.split(",")
    models = {}
    for name in names:
        start = time.perf_counter()
        models[name] = load_stage(RandomCheckpoint(cfgs[name]), quant_mode=args.qtype)
        fused = sum(layer.kernel_args is not None for layer in models[name].model.layers.values())
        print(f"built {name} in {time.perf_counter() - start:.1f} s "
              f"({fused}/{args.layers} layers on the one-call kernel)", flush=True)
    results = {n: [] for n in names}
    for _ in range(args.runs):  # alternate, so load changes hit every family alike
        for name in names:
            results[name].append(decode_tok_s(models[name], args.prompt, args.steps, clock))
    print(f"\n{args.qtype}, hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, "
          f"heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, threads "
          f"{torch.get_num_threads()}, decode after a {args.prompt}-token prompt, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    base = statistics.median(results["llama"]) if "llama" in results else None
    for name in names:
        med = statistics.median(results[name])
        ratio = f"  {med / base:.3f} x llama" if base else ""
        print(f"{name:8s} {med:7.1f} tok/s{ratio}")


if __name__ == "__main__":
    main()
