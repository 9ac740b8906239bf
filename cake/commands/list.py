"""`cake list`: the models on this machine (HF cache, cake's cache, the embedded default)."""
from __future__ import annotations

from cake import hub


def register(sub) -> None:
    p = sub.add_parser("list", help="list the models on this machine")
    p.set_defaults(func=list_models)


def list_models(args) -> int:
    models = hub.local_models()
    if not models:
        print("no local models")
        return 0
    rows = [(m.name, hub.human_size(m.size), "complete" if m.complete else "partial", m.source,
             str(m.path)) for m in models]
    header = ("NAME", "SIZE", "STATE", "SOURCE", "PATH")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0
