"""Batch-1 decode on a GPU (target 5 of the text issue), in one run on the device machine:

    PYTHONPATH=. python benchmarks/gpu_bench.py            # Qwen2.5-0.5B shape, random bf16
    PYTHONPATH=. python benchmarks/gpu_bench.py --tiny --device cpu   # a smoke test anywhere

A Qwen2ForCausalLM of Qwen2.5-0.5B's shape with random bf16 weights is built on the device
(no download is possible there), saved as a checkpoint and loaded by our loader. Measured in
the same process: transformers `generate` (eager, greedy, batch 1); our model eager; our
model with the decode step captured in a CUDA graph (static KV cache, position as a device
tensor, greedy choice inside the graph); a device-to-device copy for the memory bandwidth.
Prints a table and, last, one JSON line with tok/s, the speedup over transformers and the
fraction of the bandwidth bound (weight bytes x tok/s / copy bandwidth).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from cake.text.kv_cache import KVCache, StepBatch
from cake.text.loader import load_stage
from cake.text.weights import SafetensorsCheckpoint

QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              use_sliding_window=False)
TINY = dict(QWEN05, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    n, start = 20, time.perf_counter()
    for _ in range(n):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * n / (time.perf_counter() - start)


def transformers_decode(hf, prompt, new_tokens, device) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              pad_token_id=0)
    hf.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
    sync(device)
    start = time.perf_counter()
    out = hf.generate(ids, **kw)
    sync(device)
    return new_tokens / (time.perf_counter() - start), out[0, len(prompt):].tolist()


def prefill(model, cache, prompt, device):
    batch = StepBatch.make([list(range(len(prompt)))], [0], device)
    return model(torch.tensor([prompt], device=device), batch, cache,
                 torch.tensor([len(prompt) - 1], device=device))


def our_eager(model, cache, prompt, new_tokens, device) -> tuple[float, list[int]]:
    """The serving path's step: positions from the host, one row."""
    with torch.inference_mode():
        logits = prefill(model, cache, prompt, device)
        out = [int(logits.argmax(-1))]
        sync(device)
        start = time.perf_counter()
        for i in range(new_tokens - 1):
            pos = len(prompt) + i
            batch = StepBatch.make([[pos]], [0], device)
            logits = model(torch.tensor([[out[-1]]], device=device), batch, cache,
                           torch.zeros(1, dtype=torch.long, device=device))
            out.append(int(logits.argmax(-1)))
        sync(device)
        return (new_tokens - 1) / (time.perf_counter() - start), out


def our_graph(model, cache, prompt, new_tokens, device) -> tuple[float, list[int]]:
    """The decode step as one CUDA graph: static cache (slot 0, whole capacity attended
    under a mask), the position and the token live on the device, and the greedy choice,
    the token feed and the position increment happen inside the graph."""
    with torch.inference_mode():
        logits = prefill(model, cache, prompt, device)
        token = logits.argmax(-1, keepdim=True)  # [1, 1]
        pos = torch.tensor([[len(prompt)]], device=device)
        batch = StepBatch(positions=pos, slots=torch.zeros(1, dtype=torch.long, device=device),
                          kv_len=cache.max_len, span=None, first_slot=0)
        at = torch.zeros(1, dtype=torch.long, device=device)
        tokens = torch.zeros(new_tokens, dtype=torch.long, device=device)
        step = torch.zeros((), dtype=torch.long, device=device)
        tokens[0] = token[0, 0]

        def decode():
            nxt = model(token, batch, cache, at).argmax(-1, keepdim=True)
            token.copy_(nxt)
            pos.add_(1)
            step.add_(1)
            tokens.index_copy_(0, step.view(1), nxt.view(1))

        if device.type != "cuda":  # no graphs here: run the same static step eagerly
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                decode()
            return (new_tokens - 1) / (time.perf_counter() - start), tokens.tolist()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, then undo its step
            decode()
            pos.sub_(1)
            step.sub_(1)
            token.copy_(tokens[0].view(1, 1))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode()
        sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            graph.replay()
        sync(device)
        return (new_tokens - 1) / (time.perf_counter() - start), tokens.tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    import transformers

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**(TINY if args.tiny else QWEN05))
    with torch.device(device):
        hf = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    prompt = list(range(100, 116))
    hf_tok_s, hf_tokens = transformers_decode(hf, prompt, args.tokens, device)

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = load_stage(SafetensorsCheckpoint(folder), dtype=torch.bfloat16,
                           device=str(device))
    a = model.args
    capacity = len(prompt) + args.tokens + 8

    def new_cache():
        return KVCache(range(a.num_hidden_layers), 1, capacity, a.num_key_value_heads,
                       a.head_dim, torch.bfloat16, device, initial_len=capacity)

    eager_tok_s, eager_tokens = our_eager(model, new_cache(), prompt, args.tokens, device)
    graph_tok_s, graph_tokens = our_graph(model, new_cache(), prompt, args.tokens, device)
    bw = copy_bandwidth(device, 1 << (30 if device.type == "cuda" else 26))
    best = max(graph_tok_s, eager_tok_s)
    agree = sum(1 for _ in zip(hf_tokens, eager_tokens))
    for i, (x, y) in enumerate(zip(hf_tokens, eager_tokens)):
        if x != y:
            agree = i
            break
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, {'tiny' if args.tiny else 'Qwen2.5-0.5B'}-shaped, bf16, "
          f"{weight_bytes / 1e9:.3f} GB of weights, batch 1, {args.tokens} new tokens, greedy")
    print(f"{'transformers generate (eager)':36} {hf_tok_s:9.1f} tok/s")
    print(f"{'cake eager':36} {eager_tok_s:9.1f} tok/s")
    label = "cake, decode step as a CUDA graph" if device.type == "cuda" else \
        "cake, static step (no graph on cpu)"
    print(f"{label:36} {graph_tok_s:9.1f} tok/s")
    print(f"static-step tokens equal eager tokens: {graph_tokens == eager_tokens}")
    print(f"device-to-device copy: {bw / 1e9:.1f} GB/s -> bound {bw / weight_bytes:.0f} tok/s")
    print(f"first {agree} greedy tokens equal to transformers' (bf16 rounding may split later)")
    print(json.dumps({"device": name, "transformers_tok_s": round(hf_tok_s, 1),
                      "cake_eager_tok_s": round(eager_tok_s, 1),
                      "cake_graph_tok_s": round(graph_tok_s, 1),
                      "speedup_vs_transformers": round(best / hf_tok_s, 2),
                      "copy_gb_s": round(bw / 1e9, 1),
                      "fraction_of_bandwidth_bound": round(weight_bytes * best / bw, 3)}))


if __name__ == "__main__":
    main()
