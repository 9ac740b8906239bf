"""cake against llama.cpp's server on a Qwen3-30B-A3B-shaped MoE GGUF, over HTTP.

    python benchmarks/bench_moe.py [--layers 2] [--type Q4_K_M] [--threads 2] [--reps 2]

The model is a random qwen3moe GGUF of Qwen3-30B-A3B's width (hidden 2048, 32/4 heads of 128,
128 experts of 768, 8 routed per token; the default model's vocabulary) with fewer layers
than its 48 (the full model does not fit this machine), built with gguf.GGUFWriter in F16
and quantized by llama.cpp's llama_model_quantize. Three servers run side by side, the same
threads: llama.cpp (`python -m llama_cpp.server --interrupt_requests False`), cake with every
expert resident, and cake with --expert-offload under a budget of half the experts' bytes.
Each repetition measures each in turn: decode = one greedy reply of 64 tokens, tokens / wall
time, and the server process's CPU time per token (user + system over all its threads, from
/proc: on a shared machine the fairer figure; llama.cpp's threads spin while waiting, which
counts). Best of the repetitions; ratios are cake / llama.cpp from the same run; the load
average before and after. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from real_size_bench import (LLAMA_NO_EXTRA_BUFTS, Server, quantized,  # noqa: E402
                             random_gguf_writer, write_random)
from text_bench import QUESTIONS, cpu_seconds  # noqa: E402

A3B = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, used=8, expert_ffn=768)
NEW_TOKENS = 64


def build_qwen3moe(path: Path, shape: str) -> None:
    s = dict(A3B, layers=int(shape.split("-")[1]))
    h, hd, e, f = s["hidden"], s["head_dim"], s["experts"], s["expert_ffn"]
    w, vocab, types = random_gguf_writer(path, "qwen3moe", s, 6144)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_expert_count(e)
    w.add_expert_used_count(s["used"])
    w.add_expert_feed_forward_length(f)
    tensors = [("token_embd.weight", (vocab, h)), ("output.weight", (vocab, h))]
    for i in range(s["layers"]):
        tensors += [(f"blk.{i}.attn_norm.weight", (h,)),
                    (f"blk.{i}.attn_q.weight", (s["heads"] * hd, h)),
                    (f"blk.{i}.attn_k.weight", (s["kv_heads"] * hd, h)),
                    (f"blk.{i}.attn_v.weight", (s["kv_heads"] * hd, h)),
                    (f"blk.{i}.attn_q_norm.weight", (hd,)), (f"blk.{i}.attn_k_norm.weight", (hd,)),
                    (f"blk.{i}.attn_output.weight", (h, s["heads"] * hd)),
                    (f"blk.{i}.ffn_norm.weight", (h,)),
                    (f"blk.{i}.ffn_gate_inp.weight", (e, h)),
                    (f"blk.{i}.ffn_gate_exps.weight", (e, f, h)),
                    (f"blk.{i}.ffn_up_exps.weight", (e, f, h)),
                    (f"blk.{i}.ffn_down_exps.weight", (e, h, f))]
    tensors.append(("output_norm.weight", (h,)))
    write_random(w, tensors, types)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "cake" / "bench")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="the interpreter whose llama_cpp serves with its extra buffer types "
                         "(e.g. a venv with a wheel built without AMX, so that its CPU_REPACK "
                         "layouts run on an AMX VM); default: this one's, without them (its AMX "
                         "path crashes on this VM)")
    ap.add_argument("--no-lookup", action="store_true",
                    help="cake without prompt-lookup guessing (--draft-tokens 0): a random "
                         "model's greedy text loops, which lookup copies, unlike real text")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    model = quantized(args.dir, f"a3b-{args.layers}", args.type, build_qwen3moe)
    from gguf import GGUFReader

    experts = sum(int(t.n_bytes) for t in GGUFReader(model).tensors if "_exps" in t.name)
    half_mib = experts / 2 / 2**20
    cake = [sys.executable, "-m", "cake", "serve", str(model), "--max-batch", "1",
            "--ctx-size", "1024", *(["--draft-tokens", "0"] if args.no_lookup else [])]
    launch = ["-c", LLAMA_NO_EXTRA_BUFTS] if args.llama_python == sys.executable \
        else ["-m", "llama_cpp.server"]
    servers = {
        "llama.cpp": Server([args.llama_python, *launch, "--model", str(model),
                             "--n_threads", str(args.threads), "--n_threads_batch",
                             str(args.threads), "--interrupt_requests", "False", "--n_ctx",
                             "1024", "--host", "127.0.0.1", "--port"], args.threads),
        "cake": Server([*cake, "--api"], args.threads),
        "cake-offload": Server([*cake, "--expert-offload", "--expert-memory",
                                f"{half_mib:.0f}", "--api"], args.threads),
    }
    runs = {name: [] for name in servers}
    cpu_ms = {name: [] for name in servers}
    texts = {}
    load_before = os.getloadavg()
    try:
        for rep in range(args.reps):
            names = list(servers)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                pid = servers[name].proc.pid
                cpu = cpu_seconds(pid)
                wall, text, n = servers[name].timed_chat(
                    f"{QUESTIONS[rep % len(QUESTIONS)]} ({rep})", NEW_TOKENS)
                cpu = cpu_seconds(pid) - cpu
                runs[name].append(n / wall)
                cpu_ms[name].append(1000 * cpu / n)
                texts.setdefault(name, []).append(text)
                print(f"rep {rep + 1} {name}: {n} tokens, {n / wall:.1f} tok/s, "
                      f"{1000 * cpu / n:.1f} CPU ms/token, load {os.getloadavg()[0]:.1f}",
                      file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    best = {name: max(r) for name, r in runs.items()}
    least_cpu = {name: min(r) for name, r in cpu_ms.items()}
    result = {"model": model.name, "threads": args.threads, "lookup": not args.no_lookup,
              "experts_mib": round(experts / 2**20),
              "offload_budget_mib": round(half_mib),
              "decode_tok_s": {k: round(v, 1) for k, v in best.items()},
              "decode_ratio": round(best["cake"] / best["llama.cpp"], 2),
              "offload_decode_ratio": round(best["cake-offload"] / best["llama.cpp"], 2),
              "cpu_ms_per_token": {k: round(v, 1) for k, v in least_cpu.items()},
              "cpu_ratio": round(least_cpu["llama.cpp"] / least_cpu["cake"], 2),
              "offload_cpu_ratio": round(least_cpu["llama.cpp"] / least_cpu["cake-offload"], 2),
              "load_avg_before_after": [round(load_before[0], 1),
                                        round(os.getloadavg()[0], 1)],
              "offload_text_equal": texts["cake"] == texts["cake-offload"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
