"""Text models on the command line: flags, loading, and `cake run` for a prompt."""
from __future__ import annotations

import sys


def add_args(p) -> None:
    g = p.add_argument_group("text models")
    g.add_argument("--temperature", type=float, default=0.8, help="default sampling temperature")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("-n", "--sample-len", type=int, default=2048,
                   help="default max tokens to generate")
    g.add_argument("--max-batch", type=int, default=64,
                   help="most sequences decoded together (the KV memory may allow fewer)")
    g.add_argument("--kv-memory", type=memory_size, default=None,
                   help="memory for the KV cache's block pool, e.g. 2GiB or 512MiB "
                        "(default: a quarter of the free RAM, or of a GPU's free memory)")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="requests that may wait for a place; more get 429 Too Many Requests")
    g.add_argument("--draft-tokens", type=int, default=7,
                   help="tokens greedy decoding guesses ahead by prompt lookup and verifies "
                        "in the same forward (0: off; default 7: a step of 8 rows, one tile "
                        "of the kernels)")
    g.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="a small model of the same vocabulary (folder, .gguf or repo id) that "
                        "guesses tokens ahead for the model to verify; one machine only")
    g.add_argument("--draft-min", type=int, default=0,
                   help="tokens the draft model guesses each step at least (default 0: as "
                        "many as its record of held guesses says pay, up to --draft-tokens)")
    g.add_argument("--ctx-size", type=int, default=None,
                   help="context length (default: the model's)")
    g.add_argument("--quant", choices=["auto", "none", "q8_0", "q4_0", "q4_1"], default="auto",
                   help="weight format on CPU: auto keeps a GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/"
                        "Q4_K/Q5_K/Q6_K blocks (other GGUF quants become Q8_0) and safetensors in --dtype; none dequantizes")
    g.add_argument("--expert-offload", action="store_true",
                   help="MoE: keep the experts memory-mapped in the checkpoint and only the "
                        "recently routed ones resident (automatic when they do not fit)")
    g.add_argument("--expert-memory", type=float, default=None, metavar="MIB",
                   help="MoE with offloaded experts: MiB of them kept resident "
                        "(default: half the free memory)")


def memory_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '100000' (bytes) -> bytes."""
    import argparse
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 2GiB, 512MiB)")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) or power == 0 else 1000) ** power)


def load(args):
    from cake import hub
    from cake.text.draft_model import UnfitDraft
    from cake.text.sampling import SamplingParams

    ref = hub.resolve(args.model)
    draft = None
    if getattr(args, "draft_model", None):
        try:
            found = hub.resolve(args.draft_model)
        except hub.ModelNotFound as e:
            raise SystemExit(f"cake: --draft-model: {e}") from e
        draft = (found.path, found.model_id)
    defaults = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                              seed=args.seed, max_tokens=args.sample_len)
    try:
        return _load(args, ref, defaults, draft)
    except UnfitDraft as e:
        raise SystemExit(f"cake: {e}") from e


def _load(args, ref, defaults, draft):
    from cake.text.loader import DTYPES
    from cake.text.serving import load_text_model

    return load_text_model(ref.path, ref.model_id, device=args.device,
                           dtype=DTYPES[args.dtype] if args.dtype else None, defaults=defaults,
                           max_batch=args.max_batch, context_length=args.ctx_size,
                           cluster=getattr(args, "cluster", None),
                           quant=getattr(args, "quant", "auto"),
                           kv_memory=getattr(args, "kv_memory", None),
                           max_queue=getattr(args, "max_queue", 1024),
                           draft_tokens=getattr(args, "draft_tokens", 7),
                           expert_offload=getattr(args, "expert_offload", False),
                           expert_memory=None if getattr(args, "expert_memory", None) is None
                           else int(args.expert_memory * 2**20),
                           draft_model=draft, draft_min=getattr(args, "draft_min", 0))


def run(model, args) -> None:
    """Stream the answer to one user message to stdout."""
    import queue

    outputs: queue.Queue = queue.Queue()
    prompt = model.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    if len(prompt) >= model.context_length:
        raise SystemExit(f"cake: the prompt is {len(prompt)} tokens; the context holds "
                         f"{model.context_length}")
    model.engine.submit(prompt, model.params(), outputs.put)
    while True:
        out = outputs.get()
        sys.stdout.write(out.text)
        sys.stdout.flush()
        if out.finished:
            break
    sys.stdout.write("\n")
    if out.finish_reason == "error":
        raise SystemExit(f"cake: {out.error}")
