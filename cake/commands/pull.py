"""`cake pull REPO`: download a model into the Hugging Face cache, with progress bars."""
from __future__ import annotations

import logging

from cake import hub


def register(sub) -> None:
    p = sub.add_parser("pull", help="download a model from the Hugging Face Hub into the cache")
    p.add_argument("repo", help="Hugging Face repo id, owner/name")
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="only files matching this glob (repeatable), e.g. '*Q4_K_M.gguf'")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.set_defaults(func=pull)


def pull(args) -> int:
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the progress bars say enough
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not hub.looks_like_repo_id(args.repo):
        raise SystemExit(f"cake: {args.repo!r} is not a Hugging Face repo id (owner/name)")
    path = hub.pull(args.repo, include=args.include, revision=args.revision)
    model = next((m for m in hub.find_local(args.repo) if m.source == "hf-cache"), None)
    size = hub.human_size(model.size) if model else "?"
    state = "complete" if model is None or model.complete else "partial"
    print(f"{args.repo}: {size}, {state}, at {path}")
    return 0
