"""`cake run [MODEL] PROMPT`: one generation, no server."""
from __future__ import annotations

from cake import modality


def register(sub) -> None:
    p = sub.add_parser("run", help="generate once from a prompt and exit")
    modality.add_common_args(p)
    p.add_argument("prompt", help="the prompt (text to answer, draw or speak)")
    p.set_defaults(func=run)


def run(args) -> int:
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
