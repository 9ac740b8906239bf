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
    p.add_argument("--drain-grace", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests in flight may take to finish "
                        "(new ones get 503); then streams end with an error chunk (default 5)")
    from cake.cluster import cli as cluster_cli
    cluster_cli.add_args(p)
    p.set_defaults(func=serve)


def serve(args) -> int:
    """Bind at once, then load: meanwhile /health answers 503 with the phase, and every
    other route 503 with a JSON error. A failed load ends the process as before."""
    import gc
    # The imports create ~1M objects that live as long as the server: the cyclic collector's
    # passes over them were ~15% of a start's CPU time. Off while importing; then what they
    # made is frozen (never scanned again) and loading runs with the collector on, so that
    # loading's own garbage goes as it comes.
    gc.disable()
    import signal
    import threading
    import time

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
    state = ServerState(loading={"phase": "loading", "model": args.model or "the default"})
    server = uvicorn.Server(uvicorn.Config(create_app(state, access), host=host, port=int(port),
                                           log_level="warning", timeout_graceful_shutdown=2))
    # The server runs in a thread (uvicorn handles no signals there): loading stays in the
    # main thread, where Ray wants to be started.
    thread = threading.Thread(target=server.run, name="cake-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(f"cake: cannot listen at {host}:{port}")
        time.sleep(0.005)
    print(f"cake: listening at http://{host}:{port}, loading the model", flush=True)
    model = None
    gc.freeze()
    gc.enable()
    try:
        model = module.load(args)
        state.ready(model.model_id, attr, model)
        print(f"cake: serving {model.model_id} at http://{host}:{port}", flush=True)
        signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn handles none in a thread
            signal.signal(sig, lambda signum, _: signals.append(signum))
        while thread.is_alive() and not signals:
            thread.join(0.5)
        if signals:
            drain(state, args.drain_grace, signals)
    finally:
        server.should_exit = True
        thread.join(30)
        if hasattr(model, "close"):
            model.close()
    return 0


def drain(state, grace: float, signals: list) -> None:
    """New requests get 503 at once; those in flight get `grace` seconds to finish, then
    whatever still waits for events ends (a stream with an error chunk). A second signal
    cuts the wait short."""
    import time

    state.draining = True
    log.info("stopping: %d request(s) in flight, %.1f s to finish", state.in_flight, grace)
    deadline = time.monotonic() + grace
    while state.in_flight and time.monotonic() < deadline and len(signals) < 2:
        time.sleep(0.05)
    if state.in_flight:
        log.warning("stopping: ending %d request(s) still in flight", state.in_flight)
        state.end_streams()
        deadline = time.monotonic() + 2  # time to send their last chunk
        while state.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
