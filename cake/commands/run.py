"""`cake run [MODEL] PROMPT`: one generation, no server."""
from __future__ import annotations

from cake import modality


def register(sub) -> None:
    p = sub.add_parser("run", help="generate once from a prompt and exit")
    modality.add_common_args(p)
    p.add_argument("prompt", nargs="?", help="the prompt (text to answer, draw or speak)")
    from cake.commands.worker import add_worker_args
    add_worker_args(p)  # Cake's worker form: `cake run --cluster-key K --name N`, no model
    p.set_defaults(func=run)


def run(args) -> int:
    if args.prompt is None and args.model is not None:
        args.model, args.prompt = None, args.model  # `cake run PROMPT`
    if args.prompt is None:
        if args.cluster_key:
            from cake.commands import worker
            return worker.run(args)
        raise SystemExit("cake: run needs a prompt")
    types = modality.available()
    if args.model_type not in types:
        raise SystemExit(f"cake: {args.model_type} support is not installed")
    module, _ = types[args.model_type]
    model = module.load(args)
    try:
        module.run(model, args)
    finally:
        if hasattr(model, "close"):
            model.close()
    return 0
