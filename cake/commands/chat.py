"""`cake chat [MODEL]`: chat in the terminal with a model loaded here, or with a running
server (`--server URL [--api-key KEY]`)."""
from __future__ import annotations

import os

from cake import modality


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (a local model or a running server)")
    modality.add_common_args(p)
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
    if args.model_type != "text-model":
        raise SystemExit("cake: chat needs a text model")
    types = modality.available()
    module, _ = types["text-model"]
    return LocalBackend(module.load(args))


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
