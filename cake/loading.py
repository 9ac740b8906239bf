"""How far loading has got, for /health while the server starts: the loader says which
tensors it will read (and their stored bytes), ticks each off as it is read, and clears the
figures when it is done (so no later reader sees a finished load as one in progress)."""
from __future__ import annotations

import threading

_lock = threading.Lock()
_sizes: dict[str, int] = {}
_done: set[str] = set()
_phase = ""


def expect(sizes: dict[str, int], phase: str = "loading weights") -> None:
    """A new load: name -> bytes of what will be read."""
    global _phase
    with _lock:
        _sizes.clear()
        _sizes.update(sizes)
        _done.clear()
        _phase = phase


def finished() -> None:
    expect({})


def loaded(name: str) -> None:
    with _lock:
        if name in _sizes:
            _done.add(name)


def reading(get):
    """get(name) -> tensor, ticking each name off as it is read."""
    def read(name: str):
        tensor = get(name)
        loaded(name)
        return tensor
    return read


def progress() -> dict:
    """{} when no load is under way; else the phase, bytes read and expected, and their
    fraction."""
    with _lock:
        if not _sizes:
            return {}
        total = sum(_sizes.values())
        done = sum(_sizes[n] for n in _done)
        return {"phase": _phase, "bytes_loaded": done, "bytes_total": total,
                "fraction": round(done / total, 4) if total else 1.0}
