"""Our quantized products alone on the matrices of one 1B-class Llama layer (hidden 2048, 32/8
heads, FFN 8192: fused q/k/v 3072x2048, o 2048x2048, fused gate/up 16384x2048, down 2048x8192),
per GGUF type and batch rows M (1: a decode step, 8: eight streams, 512: a prompt).

    python benchmarks/kernel_bench.py [--types Q4_0,Q4_K,Q6_K,Q8_0] [--rows 1,8,512] [--reps 5]

Times are this process's CPU time, best of --reps, on --threads threads (default 1): on a
machine whose cores other jobs share, wall time measures the neighbours more than the kernels.
Prints, per type and M, the best time of a layer's four products, the weight bytes streamed per
second (M = 1), the integer multiply-adds per second (M > 1), and what 16 such layers would do
(tokens per second; the head and attention not counted). Random blocks: the speed of a product
does not depend on the values.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cake.text import kernels, quant  # noqa: E402
from tests.test_quant import gguf_blocks  # noqa: E402

LAYER = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]  # (out, in)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_0,Q4_K,Q5_K,Q6_K,Q8_0")
    ap.add_argument("--rows", default="1,8,512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-rows", type=int, default=0, help="CAKE_DENSE_ROWS for this run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels.ops()
    torch.ops.cake.set_dense_rows(args.dense_rows)
    print(f"kernels: {torch.ops.cake.isa()}, {args.threads} threads")
    for name in args.types.split(","):
        qtype = GGMLQuantizationType[name]
        layers = [quant.QuantLinear(gguf_blocks(qtype, n, k, n + k), qtype, k) for n, k in LAYER]
        nbytes = sum(m.packed.numel() for m in layers)
        for M in map(int, args.rows.split(",")):
            xs = [torch.randn(M, k) for _, k in LAYER]
            best = float("inf")
            for _ in range(args.reps):
                t = time.process_time()
                for m, x in zip(layers, xs):
                    m(x)
                best = min(best, (time.process_time() - t) / args.threads)
            macs = M * sum(n * k for n, k in LAYER)
            rate = (f"{nbytes / best / 1e9:6.2f} GB/s" if M == 1
                    else f"{macs / best / 1e9:6.1f} GMAC/s")
            print(f"{name:5} M={M:4d} {best * 1e3:8.2f} ms/layer  {rate}  "
                  f"16 layers: {M / (16 * best):8.1f} tok/s")
    print(f"(per thread: CPU time / {args.threads}; dense rows {args.dense_rows})")


if __name__ == "__main__":
    main()
