"""`cake chat [MODEL]`: chat in the terminal with a model loaded here, or with a running
server (`--server URL [--api-key KEY]`)."""
from __future__ import annotations

import os


def register(sub) -> None:
    from cake.text import cli as text_cli

    p = sub.add_parser("chat", help="chat in the terminal (a local model or a running server)")
    p.add_argument("model", nargs="?", help="text model folder, .gguf file or Hugging Face "
                   "repo id (default: the embedded model)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: best available")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"])
    text_cli.add_args(p)
    p.add_argument("--server", metavar="URL", help="talk to a running cake server instead")
    p.add_argument("--api-key", default=os.environ.get("CAKE_API_KEY"),
                   help="the server's API key (default: $CAKE_API_KEY)")
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=chat)


def make_backend(args):
    """A RemoteBackend for --server, else the model loaded in this process."""
    from cake.tui.backends import LocalBackend, RemoteBackend

    if args.server:
        backend = RemoteBackend(args.server, args.api_key, max_tokens=args.sample_len,
                                temperature=args.temperature)
        backend.connect()  # fails here, before the screen opens, when unreachable
        return backend
    from cake.text import cli as text_cli

    return LocalBackend(text_cli.load(args))


def make_app(args, backend):
    from cake.tui.app import ChatApp

    return ChatApp(backend, system=args.system)


def chat(args) -> int:
    from cake.tui.backends import BackendError

    try:
        backend = make_backend(args)
    except BackendError as e:
        raise SystemExit(f"cake: {e}")
    try:
        make_app(args, backend).run()
    finally:
        backend.close()
    return 0
