"""The `cake` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model folder, .gguf file or Hugging Face repo id "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model-type", default="text-model",
                   choices=["text-model", "image-model", "audio-model"])
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: best available")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"],
                   help="default: the fastest correct one for the device")
    p.add_argument("--temperature", type=float, default=0.8, help="default sampling temperature")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", "--sample-len", type=int, default=2048,
                   help="default max tokens to generate")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--ctx-size", type=int, default=None,
                   help="context length (default: the model's)")


def load_text(args):
    from cake import hub
    from cake.text.loader import DTYPES
    from cake.text.sampling import SamplingParams
    from cake.text.serving import load_text_model

    ref = hub.resolve(args.model)
    defaults = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                              seed=args.seed, max_tokens=args.sample_len)
    return load_text_model(ref.path, ref.model_id, device=args.device,
                           dtype=DTYPES[args.dtype] if args.dtype else None, defaults=defaults,
                           max_batch=args.max_batch, context_length=args.ctx_size)


def cmd_serve(args) -> int:
    import uvicorn

    from cake.server.app import ServerState, create_app

    if args.model_type != "text-model":
        print(f"cake: {args.model_type} serving is not available yet", file=sys.stderr)
        return 2
    host, _, port = args.api.rpartition(":")
    text = load_text(args)
    state = ServerState(model_id=text.model_id, text=text)
    print(f"cake: serving {text.model_id} at http://{host}:{port}", flush=True)
    uvicorn.run(create_app(state), host=host, port=int(port), log_level="warning")
    text.engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cake", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model through the OpenAI-compatible API")
    add_model_args(serve)
    serve.add_argument("--api", default="127.0.0.1:8080", help="HOST:PORT to listen on")
    serve.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("CAKE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cake.hub import ModelNotFound
    try:
        return args.func(args)
    except ModelNotFound as e:
        print(f"cake: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
