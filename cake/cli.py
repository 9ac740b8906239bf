"""The `cake` command line: one module per subcommand under cake/commands."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Subcommand modules; each has register(subparsers) that adds its parser and sets `func`.
COMMANDS = ["serve", "run", "chat", "pull", "list", "rm", "worker", "split"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cake", description="cake: a multimodal inference "
                                     "server with an OpenAI-compatible API")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"cake.commands.{name}").register(sub)
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if rest:  # positionals after options: `cake run MODEL --model-type image-model "a cat"`
        command = args.command
        args = sub.choices[command].parse_intermixed_args(argv[argv.index(command) + 1:])
        args.command = command
    logging.basicConfig(level=os.environ.get("CAKE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cake.hub import ModelNotFound

    try:
        return args.func(args) or 0
    except ModelNotFound as e:
        print(f"cake: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
