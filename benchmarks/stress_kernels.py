"""Stress the CPU kernels' thread pool: many kernel calls of varying sizes from several Python
threads at once, while busy processes compete for the cores. Every result must equal the
one computed alone beforehand (the kernels are deterministic), and the process must live.

    python benchmarks/stress_kernels.py --seconds 600 --threads 4 --busy 2

Prints one JSON line: calls, mismatches, errors. Exits 1 on any mismatch or error (a crash
ends the process with a signal, which the caller sees as its exit status).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time

import torch

from cake.text import kernels, quant

BUSY = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


def linear_cases() -> list:
    """qlinear at decode and prefill sizes in each packed type."""
    out = []
    for qtype in sorted(quant.QTYPES.values()):  # the types gguf can quantize to
        for n, k in ((64, 256), (1000, 576), (1536, 576)):
            layer = quant.QuantLinear.from_weight(torch.randn(n, k), qtype)
            for m in (1, 3, 8, 33):
                x = torch.randn(m, k)
                out.append((f"qlinear {int(qtype)} {m}x{k}x{n}", lambda x=x, layer=layer: layer(x)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--threads", type=int, default=4, help="Python threads calling kernels")
    ap.add_argument("--pool", type=int, default=4, help="kernel threads (torch threads)")
    ap.add_argument("--busy", type=int, default=2, help="busy processes competing")
    args = ap.parse_args()
    if kernels.ops() is None:
        print(json.dumps({"error": f"no kernels: {kernels.error()}"}))
        return 1
    torch.set_num_threads(args.pool)
    torch.manual_seed(0)
    todo = linear_cases() + attention_cases()
    expected = {name: fn() for name, fn in todo}
    busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(s=args.seconds + 30)])
            for _ in range(args.busy)]
    stats = {"calls": 0, "mismatches": 0, "errors": 0}
    lock = threading.Lock()
    end = time.monotonic() + args.seconds

    def hammer(seed: int) -> None:
        r = random.Random(seed)
        while time.monotonic() < end:
            name, fn = r.choice(todo)
            try:
                ok = torch.equal(fn(), expected[name])
                err = 0
            except Exception as e:  # noqa: BLE001 - counted and printed, never hidden
                print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
                ok, err = True, 1
            with lock:
                stats["calls"] += 1
                stats["mismatches"] += 0 if ok else 1
                stats["errors"] += err
                if not ok:
                    print(f"{name}: result differs from the one computed alone", file=sys.stderr)

    try:
        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(json.dumps({**stats, "seconds": args.seconds, "threads": args.threads,
                      "pool": args.pool, "busy": args.busy}))
    return 0 if stats["calls"] and not stats["mismatches"] and not stats["errors"] else 1


def attention_cases() -> list:
    """Decode attention over caches of several lengths, with and without a window."""
    ops = kernels.ops()
    out = []
    for b, kv, window in ((1, 7, 0), (4, 100, 64), (9, 300, 0), (9, 300, 64)):
        heads, kv_heads, d, cap = 9, 3, 64, 512
        kc, vc = torch.randn(b, cap, kv_heads, d).half(), torch.randn(b, cap, kv_heads, d).half()
        qkv = torch.randn(b, (heads + 2 * kv_heads) * d)
        slots, pos = torch.arange(b), torch.full((b,), kv)
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
        # each call rewrites the same k/v at `kv` from qkv, so the result is the same every time
        out.append((f"attention b={b} len={kv} window={window}",
                    lambda qkv=qkv, kc=kc, vc=vc, s=slots, p=pos, inv=inv, w=window:
                    ops.decode_attention(qkv, kc, vc, s, p, inv, heads, w)))
    return out


if __name__ == "__main__":
    sys.exit(main())
