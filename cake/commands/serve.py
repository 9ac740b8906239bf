"""`cake serve [MODEL]`: load a model and serve the OpenAI-compatible API."""
from __future__ import annotations

import logging
import os

from cake import modality

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model through the OpenAI-compatible API")
    modality.add_common_args(p)
    p.add_argument("--api", default="127.0.0.1:8080", help="HOST:PORT to listen on")
    p.add_argument("--ui-auth", metavar="USER:PASS", help="HTTP Basic auth for the web UI")
    p.add_argument("--api-key", default=os.environ.get("CAKE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $CAKE_API_KEY)")
    from cake.cluster import cli as cluster_cli
    cluster_cli.add_args(p)
    p.set_defaults(func=serve)


def serve(args) -> int:
    import uvicorn

    from cake.server.app import ServerState, create_app
    from cake.server.auth import Access

    types = modality.available()
    if args.model_type not in types:
        raise SystemExit(f"cake: {args.model_type} support is not installed")
    module, attr = types[args.model_type]
    host, _, port = args.api.rpartition(":")
    try:
        access = Access(args.ui_auth, args.api_key)
    except ValueError as e:
        raise SystemExit(f"cake: {e}")
    from cake.cluster import cli as cluster_cli
    args.cluster = cluster_cli.options(args)
    model = module.load(args)
    state = ServerState(model_id=model.model_id, **{attr: model})
    print(f"cake: serving {model.model_id} at http://{host}:{port}", flush=True)
    try:
        uvicorn.run(create_app(state, access), host=host, port=int(port), log_level="warning")
    finally:
        if hasattr(model, "close"):
            model.close()
    return 0
