"""cake against llama.cpp's server on a 1B-class Llama-shaped GGUF, per GGUF type, over HTTP.

    python benchmarks/real_size_bench.py [--types Q4_0,Q4_K_M,Q6_K,Q8_0] [--threads 2]
                                         [--reps 3] [--shape 1b|3b] [--dir DIR]

The model has random weights (built once with gguf.GGUFWriter in F16, with the default model's
tokenizer and chat template, then quantized by llama.cpp's own llama_model_quantize) and the
shape of a real one: 1b = hidden 2048, 16 layers, 32/8 heads, FFN 8192, vocab 49152. The rows
of the control tokens in the (tied) embedding are zero, so greedy replies never end early.

Per type, both servers run side by side (`cake serve` and `python -m llama_cpp.server
--interrupt_requests False`, same threads), and each repetition measures them in turn,
alternating which goes first:
- decode: one greedy reply of 128 tokens to a short chat prompt, tokens / wall time
- ttft: a fresh ~512-token prompt (a new first word each time: no prefix-cache hits), one token
- streams: 8 different prompts at once, 128 tokens each, aggregate tokens / wall time
- start: process start to the first 200 of /v1/models (cake listens at once, answering 503
  while it loads), and the CPU time the server had used by then (all its threads: a figure
  a loaded box moves less than wall time); --start-only measures nothing else, restarting
  both servers --reps times
- rss: peak resident memory while serving the 8 streams
llama.cpp runs as it ships, with its extra buffer types (weights repacked at load for its
AVX-512/AMX kernels: what a user gets), unless --llama-no-extra-bufts (for a VM where they die of
SIGILL); the buffer types its weights went to are printed (from its log).
Best of the repetitions (the machine's cores are shared: noisy); ratios are cake / llama.cpp,
streams against llama.cpp's single-stream decode. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from text_bench import (QUESTIONS, ROOT, ServerProcess, cpu_seconds, default_gguf,  # noqa: E402
                        free_port, rss_kib)
from text_workers import LLAMA_NO_EXTRA_BUFTS  # noqa: E402

SHAPES = {
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192),
    "3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, ffn=8192),
}
# llama_model_quantize's ftype numbers (llama.h)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q5_K_M": 17,
          "Q6_K": 18}
NEW_TOKENS, STREAMS = 128, 8


def random_gguf_writer(path: Path, arch: str, shape: dict, ffn: int):
    """(a GGUFWriter with the shape's metadata and the default model's tokenizer, its vocab
    size, its token types)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    src = GGUFReader(default_gguf())
    w = GGUFWriter(path, arch)
    w.add_name("cake-bench-random")
    w.add_block_count(shape["layers"])
    w.add_context_length(8192)
    w.add_embedding_length(shape["hidden"])
    w.add_feed_forward_length(ffn)
    w.add_head_count(shape["heads"])
    w.add_head_count_kv(shape["kv_heads"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)  # mostly F16
    for name, field in src.fields.items():
        if name.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub)
    return (w, len(src.fields["tokenizer.ggml.tokens"].data),
            src.fields["tokenizer.ggml.token_type"].contents())


def write_random(w, tensors: list, types: list) -> None:
    """Random F16 matrices scaled by 1/sqrt(fan-in), F32 ones for vectors, written tensor by
    tensor (never all in memory); the control tokens' embedding rows are zero."""
    dtype = lambda s: np.float32 if len(s) == 1 else np.float16  # noqa: E731
    for name, s in tensors:
        w.add_tensor_info(name, s, np.dtype(dtype(s)), int(np.prod(s)) * np.dtype(dtype(s)).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    control = [i for i, t in enumerate(types) if t != 1]  # not NORMAL
    for name, s in tensors:
        if len(s) == 1:
            w.write_tensor_data(np.ones(s, np.float32))
            continue
        x = (rng.standard_normal(s, dtype=np.float32) * (1.0 / np.sqrt(s[-1]))).astype(np.float16)
        if name == "token_embd.weight":
            x *= np.float16(np.sqrt(s[1]) * 0.05)
            x[control] = 0
        w.write_tensor_data(x)
    w.close()


def build_f16(path: Path, shape: dict) -> None:
    """A Llama GGUF with random F16 matrices."""
    h, f, nh, nkv = shape["hidden"], shape["ffn"], shape["heads"], shape["kv_heads"]
    hd = h // nh
    w, vocab, types = random_gguf_writer(path, "llama", shape, f)
    tensors = [("token_embd.weight", (vocab, h))]
    for i in range(shape["layers"]):
        tensors += [(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_q.weight", (h, h)),
                    (f"blk.{i}.attn_k.weight", (nkv * hd, h)),
                    (f"blk.{i}.attn_v.weight", (nkv * hd, h)),
                    (f"blk.{i}.attn_output.weight", (h, h)), (f"blk.{i}.ffn_norm.weight", (h,)),
                    (f"blk.{i}.ffn_gate.weight", (f, h)), (f"blk.{i}.ffn_up.weight", (f, h)),
                    (f"blk.{i}.ffn_down.weight", (h, f))]
    tensors.append(("output_norm.weight", (h,)))
    write_random(w, tensors, types)


def quantized(folder: Path, shape: str, qtype: str, build=None) -> Path:
    """The random model of a shape in a GGUF type, built (build(path, shape): F16) and
    quantized by llama.cpp on first use."""
    out = folder / f"random-{shape}-{qtype}.gguf"
    if out.exists():
        return out
    f16 = folder / f"random-{shape}-F16.gguf"
    if not f16.exists():
        t = time.monotonic()
        (build or (lambda p, s: build_f16(p, SHAPES[s])))(f16.with_suffix(".tmp"), shape)
        f16.with_suffix(".tmp").rename(f16)
        print(f"built {f16} in {time.monotonic() - t:.0f} s", file=sys.stderr)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    t = time.monotonic()
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {qtype} failed ({rc})")
    tmp.rename(out)
    print(f"quantized {out.name} in {time.monotonic() - t:.0f} s", file=sys.stderr)
    return out


def long_prompt(rep: int) -> str:
    """~500 tokens of text, with a first word of its own per call."""
    words = (ROOT / "README.md").read_text().split()
    return f"Version {rep}. Summarize: " + " ".join(words[:330])


class Server(ServerProcess):
    """A server started on a free port (cmd ends in the port's option), timed to ready."""

    def __init__(self, cmd: list[str], threads: int):
        port = free_port()
        t = time.perf_counter()
        super().__init__([*cmd, f"127.0.0.1:{port}" if cmd[-1] == "--api" else str(port)],
                         port, threads)
        self.start_s = time.perf_counter() - t
        self.start_cpu_s = cpu_seconds(self.proc.pid)

    def weight_buffers(self) -> list[str]:
        """The lines of llama.cpp's log that say where its weights went ('CPU_REPACK model
        buffer size = ...', 'AMX model buffer size = ...')."""
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").splitlines()
        return sorted({ln.split(": ", 1)[-1].strip() for ln in lines if "model buffer size" in ln})

    def timed_chat(self, question: str, max_tokens: int) -> tuple[float, str, int]:
        t = time.perf_counter()
        text, n = self.chat(question, max_tokens)
        return time.perf_counter() - t, text, n


def measure_starts(cake_cmd: list[str], llama_cmd: list[str], threads: int, reps: int) -> dict:
    """Start each server `reps` times, in turns (alternating which goes first); best wall
    time and CPU time to ready of each."""
    starts = {"cake": [], "llama.cpp": []}
    order = [("cake", cake_cmd), ("llama.cpp", llama_cmd)]
    for rep in range(reps):
        for name, cmd in order[::-1] if rep % 2 else order:
            server = Server(cmd, threads)
            server.stop()
            starts[name].append((server.start_s, server.start_cpu_s))
            print(f"start rep {rep + 1} {name}: {server.start_s:.2f} s, "
                  f"{server.start_cpu_s:.2f} s CPU", file=sys.stderr)
    (c, c_cpu), (ll, ll_cpu) = (min(starts[n]) for n in ("cake", "llama.cpp"))
    return {"start_s": [round(c, 2), round(ll, 2)], "start_ratio": round(c / ll, 2),
            "start_cpu_s": [round(c_cpu, 2), round(ll_cpu, 2)],
            "start_cpu_ratio": round(c_cpu / ll_cpu, 2),
            "load_average": [round(x, 1) for x in os.getloadavg()]}


def measure(server: Server, rep: int, ttft_only: bool = False, streams: bool = True) -> dict:
    """streams=False: no 8-stream run (for llama.cpp, which serves them one after the other:
    on a loaded box the longest part of the harness); RSS then peaks over the single stream."""
    ttft, _, _ = server.timed_chat(long_prompt(rep), 1)
    if ttft_only:  # decode and streams stand in as 0, RSS as what the server holds now
        return {"decode": 0.0, "ttft": ttft, "streams": 0.0, "tokens": 0,
                "rss": rss_kib(server.proc.pid) / 1024}
    one = server.serve_all([f"{QUESTIONS[rep % len(QUESTIONS)]} ({rep})"], NEW_TOKENS)
    served = server.serve_all([f"{q} [{rep}]" for q in QUESTIONS[:STREAMS]], NEW_TOKENS) \
        if streams else {"tok_s": 0.0, "rss_mib": one["rss_mib"]}
    return {"decode": one["tok_s"], "ttft": ttft, "streams": served["tok_s"],
            "rss": max(one["rss_mib"], served["rss_mib"]), "tokens": int(one["tokens"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q6_K,Q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shape", default="1b", choices=SHAPES)
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "cake" / "bench")
    ap.add_argument("--llama-no-extra-bufts", action="store_true",
                    help="llama.cpp without its AMX/repacked weight layouts (SIGILL on some VMs)")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="the interpreter whose llama_cpp serves (e.g. a venv with a wheel built "
                         "without AMX, so that its CPU_REPACK layouts run on an AMX VM)")
    ap.add_argument("--no-lookup", action="store_true",
                    help="cake without prompt-lookup guessing (--draft-tokens 0): a random "
                         "model's greedy text loops, which lookup copies, unlike real text")
    ap.add_argument("--no-llama-streams", action="store_true",
                    help="skip llama.cpp's own 8 streams (its RSS then peaks over 1 stream)")
    ap.add_argument("--ttft-only", action="store_true",
                    help="only the ~512-token prompt (and start, RSS): a quick prefill check")
    ap.add_argument("--start-only", action="store_true",
                    help="only start to ready (wall and CPU time), each server --reps times")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for qtype in args.types.split(","):
        model = quantized(args.dir, args.shape, qtype)
        cake_cmd = [sys.executable, "-m", "cake", "serve", str(model), "--max-batch",
                    str(STREAMS), *(["--draft-tokens", "0"] if args.no_lookup else []), "--api"]
        launch = ["-c", LLAMA_NO_EXTRA_BUFTS] if args.llama_no_extra_bufts else ["-m", "llama_cpp.server"]
        llama_cmd = [args.llama_python, *launch, "--model", str(model),
                     "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                     "--interrupt_requests", "False", "--n_ctx", "4096", "--host",
                     "127.0.0.1", "--port"]
        if args.start_only:
            results[qtype] = measure_starts(cake_cmd, llama_cmd, args.threads, args.reps)
            print(qtype, json.dumps(results[qtype]), file=sys.stderr, flush=True)
            continue
        cake = Server(cake_cmd, args.threads)
        llama = Server(llama_cmd, args.threads)
        llama_weights = llama.weight_buffers()
        print(f"{qtype} llama.cpp weights: {llama_weights}", file=sys.stderr)
        runs = {"cake": [], "llama.cpp": []}
        try:
            identical = None
            if not args.ttft_only:
                alone = [cake.chat(f"{q} [0]", NEW_TOKENS)[0] for q in QUESTIONS[:STREAMS]]
                together = cake.serve_all([f"{q} [0]" for q in QUESTIONS[:STREAMS]], NEW_TOKENS)
                identical = together["texts"] == alone
            for rep in range(args.reps):
                order = [("cake", cake), ("llama.cpp", llama)]
                for name, server in order[::-1] if rep % 2 else order:
                    runs[name].append(measure(server, rep + 1, args.ttft_only,
                                              name == "cake" or not args.no_llama_streams))
                    print(f"{qtype} rep {rep + 1} {name}: {runs[name][-1]}", file=sys.stderr)
        finally:
            cake.stop()
            llama.stop()
        best = {name: {"decode": max(r["decode"] for r in rs), "ttft": min(r["ttft"] for r in rs),
                       "streams": max(r["streams"] for r in rs), "rss": max(r["rss"] for r in rs),
                       "start": s.start_s}
                for (name, rs), s in zip(runs.items(), (cake, llama))}
        c, ll = best["cake"], best["llama.cpp"]
        results[qtype] = {
            "decode_tok_s": [round(c["decode"], 1), round(ll["decode"], 1)],
            "decode_ratio": round(c["decode"] / max(ll["decode"], 1e-9), 2),
            "ttft_s": [round(c["ttft"], 2), round(ll["ttft"], 2)],
            "ttft_ratio": round(c["ttft"] / ll["ttft"], 2),
            "streams8_tok_s": round(c["streams"], 1),
            "streams8_vs_llama_single": round(c["streams"] / max(ll["decode"], 1e-9), 2),
            "llama_streams8_tok_s": round(ll["streams"], 1),
            "start_s": [round(c["start"], 1), round(ll["start"], 1)],
            "start_ratio": round(c["start"] / ll["start"], 2),
            "start_cpu_s": [round(cake.start_cpu_s, 2), round(llama.start_cpu_s, 2)],
            "rss_mib": [round(c["rss"]), round(ll["rss"])],
            "rss_ratio": round(c["rss"] / ll["rss"], 2),
            "streams_identical_to_alone": identical,
            "llama_weights": llama_weights,
            "load_average": [round(x, 1) for x in os.getloadavg()],
        }
        print(qtype, json.dumps(results[qtype]), file=sys.stderr, flush=True)
    print(f"\n{args.shape} shape, {args.threads} threads, best of {args.reps}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; pairs are cake, llama.cpp")
    if args.start_only:
        print(f"{'type':8} {'start s':>12} {'x':>5} {'CPU s to ready':>15} {'x':>5}  load avg")
        for q, r in results.items():
            print(f"{q:8} {r['start_s'][0]:5.2f} {r['start_s'][1]:6.2f} {r['start_ratio']:5.2f} "
                  f"{r['start_cpu_s'][0]:7.2f} {r['start_cpu_s'][1]:7.2f} "
                  f"{r['start_cpu_ratio']:5.2f}  {r['load_average']}")
        print(json.dumps(results))
        return
    print(f"{'type':8} {'decode tok/s':>18} {'x':>5} {'~512-tok TTFT s':>16} {'x':>5} "
          f"{'8 streams':>9} {'x1':>5} {'start s':>12} {'x':>5} {'RSS MiB':>12} {'x':>5}")
    for q, r in results.items():
        print(f"{q:8} {r['decode_tok_s'][0]:8.1f} {r['decode_tok_s'][1]:9.1f} "
              f"{r['decode_ratio']:5.2f} {r['ttft_s'][0]:7.2f} {r['ttft_s'][1]:8.2f} "
              f"{r['ttft_ratio']:5.2f} {r['streams8_tok_s']:9.1f} "
              f"{r['streams8_vs_llama_single']:5.2f} {r['start_s'][0]:5.1f} "
              f"{r['start_s'][1]:6.1f} {r['start_ratio']:5.2f} {r['rss_mib'][0]:5d} "
              f"{r['rss_mib'][1]:6d} {r['rss_ratio']:5.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
