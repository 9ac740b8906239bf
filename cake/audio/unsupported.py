"""Speech checkpoints cake recognises but cannot serve yet, told apart by their files, so that
`cake serve` says what the folder holds instead of failing inside the VibeVoice loader."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

SERVED = "cake serves Piper .onnx voices, VibeVoice-1.5B and VibeVoice-Realtime-0.5B"


def is_luxtts(folder: Path) -> bool:
    """LuxTTS / ZipVoice (k2-fsa's layout): tokens.txt, and a config.json whose "model" and
    "feature" sections describe the Zipformer flow-matching model and its mel features."""
    config = folder / "config.json"
    if not (folder / "tokens.txt").is_file() or not config.is_file():
        return False
    try:
        cfg = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and "model" in cfg and "feature" in cfg


def why_not(folder: Path) -> Optional[str]:
    """Why cake cannot serve the speech checkpoint in `folder`, or None to go on loading it."""
    if folder.is_dir() and is_luxtts(folder):
        vocoder = " with a 48 kHz Vocos vocoder" if (folder / "vocoder").is_dir() else ""
        return (f"{folder.name} is a LuxTTS / ZipVoice checkpoint (Zipformer flow matching"
                f"{vocoder}), which cake does not implement yet; {SERVED}")
    return None
