"""The paged KV cache's targets, measured through `cake serve` of the embedded default model:

    python benchmarks/bench_prefix.py [--threads 2] [--spec-only] [--draft-layers N]

1. follow-up: a conversation of 1,500+ tokens; time to first token of the next turn, against
   the same turn with a cache-busting first token (same length, nothing to reuse), and the
   cached_tokens it reports against the previous prompt
2. shared system prompt: eight requests with one 1,000-token system prompt after one warm
   request: the share of their prompt tokens that came from the cache
3. 48 streams at once: the most /health saw running, aggregate tok/s, and whether every
   greedy text equals the same request alone
4. copy-heavy decoding (repeat a given list) against free text, with prompt-lookup drafts,
   and free text with drafts against without (--draft-tokens 0); as wall-clock tok/s and as
   tokens per second of the server's CPU time (what a shared machine's load disturbs least;
   at one thread the truest ratio). --spec-only runs this part alone
5. the decode-attention kernel reading scattered blocks in place, against a slot cache and
   against gathering the blocks into one first
--draft-layers N (alone): a draft model for `--draft-model`, the default model cut to its
first N layers (and its norm and head; a GGUF written here, its blocks copied as they are);
free-text and copy decode speeds of three servers up together, their streams in turn: no
draft model, the draft model as its record decides (default), and made to guess 3 tokens a
step (--draft-min 3); each greedy text the same on all three, and the draft's acceptance.
The machine is shared: ratios within one run are what to compare. Last line: JSON.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import threading
import time

import httpx

from text_bench import ServerProcess, cpu_seconds, default_gguf, free_port

FACTS = " ".join(f"Fact {i}: the lighthouse on island {i} was built in {1800 + i} and its "
                 f"keeper feeds {i % 7 + 2} cats." for i in range(1, 70))
# Written as the default model writes a list back ("Item 1: Red Apple"): given "item 0: red
# apple" it capitalises and renumbers, and the output is no longer a copy of the prompt.
LIST = ", ".join(f"Item {i}: {c}" for i, c in enumerate(
    ["Red Apple", "Green Pear", "Blue Plum", "Yellow Lemon", "Black Cherry", "White Grape",
     "Orange Mango", "Purple Fig"] * 2, start=1))


def serve(threads: int, *flags: str) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, "-m", "cake", "serve", "--api", f"127.0.0.1:{port}",
                          "--temperature", "0", *flags], port, threads)


def stream(server, messages, max_tokens: int) -> dict:
    """One streamed chat: text, time to first token, decode tok/s after it (wall clock and
    server CPU time), usage."""
    start = time.perf_counter()
    first, parts, usage, cpu_first = None, [], None, None
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=600, json={
            "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    if first is None:
                        first, cpu_first = time.perf_counter(), cpu_seconds(server.proc.pid)
                    parts.append(c["delta"]["content"])
    end, cpu_end = time.perf_counter(), cpu_seconds(server.proc.pid)
    n = usage["completion_tokens"]
    return {"text": "".join(parts), "ttft": (first or end) - start, "usage": usage,
            "decode_tok_s": (n - 1) / (end - first) if first and n > 1 else 0.0,
            "decode_tok_cpu_s": (n - 1) / (cpu_end - cpu_first)
            if first and n > 1 and cpu_end > cpu_first else 0.0}


def engine(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()["engine"]


def follow_up(server) -> dict:
    first = [{"role": "system", "content": "You answer questions about lighthouses. " + FACTS},
             {"role": "user", "content": "When was the lighthouse on island 12 built?"}]
    r1 = stream(server, first, 40)
    turn = first + [{"role": "assistant", "content": r1["text"]},
                    {"role": "user", "content": "How many cats does its keeper feed?"}]
    warm = stream(server, turn, 20)
    busted = [{**turn[0], "content": "Now: " + turn[0]["content"]}] + turn[1:]
    cold = stream(server, busted, 20)
    return {"conversation_tokens": warm["usage"]["prompt_tokens"],
            "ttft_warm_s": warm["ttft"], "ttft_cold_s": cold["ttft"],
            "ttft_ratio": warm["ttft"] / cold["ttft"],
            "cached_share_of_previous_prompt":
                warm["usage"]["prompt_tokens_details"]["cached_tokens"]
                / r1["usage"]["prompt_tokens"]}


def shared_system(server) -> dict:
    system = {"role": "system", "content": "You are a travel guide. " + FACTS[:5200]}
    stream(server, [system, {"role": "user", "content": "Hello!"}], 4)  # the warm request
    asks = [[system, {"role": "user", "content": f"What about island {i}?"}] for i in range(8)]
    with cf.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda m: stream(server, m, 8), asks))
    prompt = sum(d["usage"]["prompt_tokens"] for d in done)
    cached = sum(d["usage"]["prompt_tokens_details"]["cached_tokens"] for d in done)
    return {"system_prompt_tokens": done[0]["usage"]["prompt_tokens"], "cached_share":
            cached / prompt}


def streams48(server) -> dict:
    questions = [[{"role": "user", "content": f"What is {i} plus {i + 3}? Explain briefly."}]
                 for i in range(48)]
    most, stop = [0], threading.Event()

    def watch():
        while not stop.wait(0.05):
            most[0] = max(most[0], engine(server)["running"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(48) as pool:
        together = list(pool.map(lambda m: stream(server, m, 32), questions))
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    alone = [stream(server, m, 32)["text"] for m in questions]
    return {"most_running": most[0], "aggregate_tok_s":
            sum(d["usage"]["completion_tokens"] for d in together) / wall,
            "all_equal_alone": [d["text"] for d in together] == alone}


COPY = [{"role": "user", "content": f"Repeat this list exactly, once: {LIST}"}]
FREE = [{"role": "user", "content": "Write a long story about a dragon who paints."}]


def decode_speeds(server, reps: int = 3) -> dict:
    return interleaved_speeds({"": server}, reps)


def interleaved_speeds(servers: dict, reps: int) -> dict:
    """Decode speeds of copy-heavy and free text on each server, their streams taken in
    turn (a shared machine's load then weighs on all alike): medians of reps, wall-clock
    tok/s and tokens per server CPU second, keyed "<server>copy", "<server>free_cpu", ..."""
    runs: dict = {}
    for _ in range(reps):
        for prefix, server in servers.items():
            for name, m in (("copy", COPY), ("free", FREE)):
                r = stream(server, m, 128)
                runs.setdefault(prefix + name, []).append(r["decode_tok_s"])
                runs.setdefault(prefix + name + "_cpu", []).append(r["decode_tok_cpu_s"])
    return {k: statistics.median(v) for k, v in runs.items()}


def attention_layouts(rows: int = 8, length: int = 1024, reps: int = 200) -> dict:
    """The decode-attention kernel over the default model's shape (9 heads, 3 KV heads of 64,
    float16), rows of `length` cached positions: a slot cache, a pool of scattered 16-position
    blocks read in place through block tables, and the pool gathered into slots first."""
    import torch

    from cake.text import kernels

    assert kernels.ops() is not None, kernels.error()
    H, Hkv, D, bs = 9, 3, 64, 16
    per_row = length // bs
    g = torch.Generator().manual_seed(0)
    pool_k = torch.randn(rows * per_row, bs, Hkv, D, generator=g).half()
    pool_v = torch.randn(rows * per_row, bs, Hkv, D, generator=g).half()
    tables = torch.randperm(rows * per_row, generator=g).view(rows, per_row).contiguous()
    slot_k = pool_k[tables].reshape(rows, length, Hkv, D).contiguous()
    slot_v = pool_v[tables].reshape(rows, length, Hkv, D).contiguous()
    qkv = torch.randn(rows, (H + 2 * Hkv) * D, generator=g)
    positions = torch.full((rows,), length - 1, dtype=torch.long)
    freq = torch.zeros(D // 2)
    slots = torch.arange(rows)
    attend = torch.ops.cake.decode_attention

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e6

    def gathered():
        k = pool_k[tables].reshape(rows, length, Hkv, D)
        v = pool_v[tables].reshape(rows, length, Hkv, D)
        return attend(qkv, k, v, slots, positions, freq, H, 0)

    out_slot = attend(qkv, slot_k.clone(), slot_v.clone(), slots, positions, freq, H, 0)
    out_paged = attend(qkv, pool_k.clone(), pool_v.clone(), tables, positions, freq, H, 0)
    assert torch.allclose(out_slot, out_paged, atol=1e-4)
    return {"slot_us": timed(lambda: attend(qkv, slot_k, slot_v, slots, positions, freq, H, 0)),
            "paged_in_place_us": timed(lambda: attend(qkv, pool_k, pool_v, tables, positions,
                                                      freq, H, 0)),
            "gather_then_slot_us": timed(gathered)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec-only", action="store_true", help="only the decode speeds (part 4)")
    ap.add_argument("--reps", type=int, default=3, help="streams per decode speed (median)")
    ap.add_argument("--draft-layers", type=int, default=None,
                    help="only the draft-model speeds, with the default model's first N layers")
    args = ap.parse_args()
    if args.draft_layers:
        return draft_only(args.threads, args.reps, args.draft_layers)
    if args.spec_only:
        return spec_only(args.threads, args.reps)
    results = {"attention": attention_layouts()}
    server = serve(args.threads)
    try:
        results["follow_up"] = follow_up(server)
        results["shared_system"] = shared_system(server)
        results["streams48"] = streams48(server)
        results["spec"] = decode_speeds(server, args.reps)
        results["health"] = {k: v for k, v in engine(server).items()
                             if k.startswith(("prefix", "draft", "kv_blocks", "preempt"))}
    finally:
        server.stop()
    plain = serve(args.threads, "--draft-tokens", "0")
    try:
        results["plain"] = decode_speeds(plain, args.reps)
    finally:
        plain.stop()
    spec, plain = results["spec"], results["plain"]
    summary = {
        "followup_ttft_ratio": round(results["follow_up"]["ttft_ratio"], 3),
        "followup_cached_share": round(results["follow_up"]["cached_share_of_previous_prompt"],
                                       3),
        "shared_system_cached_share": round(results["shared_system"]["cached_share"], 3),
        "streams48_most_running": results["streams48"]["most_running"],
        "streams48_equal_alone": results["streams48"]["all_equal_alone"],
        "copy_vs_free_decode": round(spec["copy"] / spec["free"], 2),
        "copy_vs_free_decode_cpu": round(spec["copy_cpu"] / spec["free_cpu"], 2),
        "copy_spec_vs_plain": round(spec["copy"] / plain["copy"], 2),
        "free_spec_vs_plain": round(spec["free"] / plain["free"], 2),
        "free_spec_vs_plain_cpu": round(spec["free_cpu"] / plain["free_cpu"], 2),
        "attention_paged_vs_slot": round(results["attention"]["paged_in_place_us"]
                                         / results["attention"]["slot_us"], 2),
        "attention_gather_vs_paged": round(results["attention"]["gather_then_slot_us"]
                                           / results["attention"]["paged_in_place_us"], 2),
    }
    print(json.dumps(results, indent=1))
    print(json.dumps(summary))


def truncated_gguf(path, layers: int):
    """The default model's first `layers` blocks, its final norm and its (tied) head, as a
    GGUF of the same metadata and tokenizer: a draft model of the same vocabulary."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    src = GGUFReader(default_gguf())
    arch = src.fields["general.architecture"].contents()
    w = GGUFWriter(path, arch)
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer's own
        value = layers if name == f"{arch}.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, value, field.types[0], sub)
    for t in src.tensors:
        if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def draft_only(threads: int, reps: int, layers: int) -> None:
    """Decode speeds without a draft model, with one as its record decides, and with one
    made to guess; texts compared; the draft model's counts from /health."""
    import tempfile
    from pathlib import Path

    results = {"load_average_before": os.getloadavg(), "draft_layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        draft = str(truncated_gguf(Path(tmp) / f"draft-{layers}-layers.gguf", layers))
        servers = {"none_": serve(threads), "draft_": serve(threads, "--draft-model", draft),
                   "forced_": serve(threads, "--draft-model", draft, "--draft-min", "3")}
        try:
            texts = {name: [stream(s, m, 128)["text"] for m in (COPY, FREE)]
                     for name, s in servers.items()}
            results["texts_equal"] = texts["draft_"] == texts["none_"] == texts["forced_"]
            speeds = interleaved_speeds(servers, reps)
            results["speeds"] = speeds
            results["health"] = {name: {k: v for k, v in engine(s).items()
                                        if k.startswith("draft")}
                                 for name, s in servers.items()}
        finally:
            for s in servers.values():
                s.stop()
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    s = speeds
    print(json.dumps({
        "texts_equal": results["texts_equal"],
        "draft_acceptance": results["health"]["forced_"]["draft_model_acceptance"],
        **{f"{mode}_{kind}_vs_none{cpu}": round(s[f"{mode}_{kind}{cpu}"] / s[f"none_{kind}{cpu}"], 2)
           for mode in ("draft", "forced") for kind in ("free", "copy") for cpu in ("", "_cpu")}}))


def spec_only(threads: int, reps: int) -> None:
    """Part 4 alone: a server with drafts and one without, up together, their streams in
    turn; and the engines' draft counts."""
    results = {"load_average_before": os.getloadavg()}
    spec, plain = serve(threads), serve(threads, "--draft-tokens", "0")
    try:
        speeds = interleaved_speeds({"spec_": spec, "plain_": plain}, reps)
        results["speeds"] = speeds
        results["health"] = {k: v for k, v in engine(spec).items() if k.startswith("draft")}
    finally:
        spec.stop()
        plain.stop()
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    s = speeds
    print(json.dumps({
        "copy_vs_free_decode": round(s["spec_copy"] / s["spec_free"], 2),
        "copy_vs_free_decode_cpu": round(s["spec_copy_cpu"] / s["spec_free_cpu"], 2),
        "copy_spec_vs_plain": round(s["spec_copy"] / s["plain_copy"], 2),
        "copy_spec_vs_plain_cpu": round(s["spec_copy_cpu"] / s["plain_copy_cpu"], 2),
        "free_spec_vs_plain": round(s["spec_free"] / s["plain_free"], 2),
        "free_spec_vs_plain_cpu": round(s["spec_free_cpu"] / s["plain_free_cpu"], 2)}))


if __name__ == "__main__":
    main()
