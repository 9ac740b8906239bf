"""The model types cake serves. Each lives in its own package exposing:

    add_args(parser)   its command-line flags (no heavy imports at module level)
    load(args)         load the model named by args.model; returns an object with .model_id
    run(model, args)   `cake run`: one generation from args.prompt, written where asked

The server keeps the loaded object in ServerState under the type's state key.
"""
from __future__ import annotations

import importlib

MODEL_TYPES = {
    # --model-type value: (module, ServerState attribute)
    "text-model": ("cake.text.cli", "text"),
    "image-model": ("cake.image.cli", "image"),
    "audio-model": ("cake.audio.cli", "audio"),
}


def available() -> dict:
    """Model types whose package is present in this installation."""
    out = {}
    for kind, (module, attr) in MODEL_TYPES.items():
        try:
            out[kind] = (importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if not e.name or not module.startswith(e.name):
                raise
    return out


def add_common_args(parser) -> None:
    parser.add_argument("model", nargs="?", help="model folder, file or Hugging Face repo id "
                        "(default: the embedded model of the model type)")
    parser.add_argument("--model-type", default="text-model", choices=list(MODEL_TYPES))
    parser.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: best available")
    parser.add_argument("--dtype", choices=["f32", "f16", "bf16"],
                        help="default: the fastest correct one for the device")
    for module, _ in available().values():
        module.add_args(parser)
