"""Which voice samples a request may name. A client picks a voice by name (the file stem of
the --voice-prompt file or of an audio file in a --voice-dir) or by server-side path, and a
path is honoured only inside those directories or as the --voice-prompt file itself: never
an arbitrary file on the server."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


class VoiceNotAllowed(ValueError):
    pass


class VoiceLibrary:
    def __init__(self, prompt: Optional[str] = None, dirs: Optional[list[str]] = None):
        self.prompt = Path(prompt).expanduser().resolve() if prompt else None
        if self.prompt is not None and not self.prompt.is_file():
            raise FileNotFoundError(f"--voice-prompt {prompt}: no such file")
        self.dirs = []
        for d in dirs or []:
            path = Path(d).expanduser().resolve()
            if not path.is_dir():
                raise FileNotFoundError(f"--voice-dir {d}: no such directory")
            self.dirs.append(path)

    def names(self) -> dict[str, Path]:
        """Voice name -> file: every audio file in the voice directories, then the prompt."""
        found = {}
        for d in self.dirs:
            for f in sorted(d.iterdir()):
                inside = f.resolve().is_relative_to(d)  # a symlink leading out is no voice
                if f.suffix.lower() in AUDIO_SUFFIXES and f.is_file() and inside:
                    found.setdefault(f.stem, f)
        if self.prompt is not None:
            found[self.prompt.stem] = self.prompt
        return found

    def check_path(self, path: str) -> Path:
        """The file a request's voice_path names, if it is allowed; VoiceNotAllowed otherwise.
        Symlinks are resolved first, so a link inside a voice directory cannot lead out."""
        resolved = Path(path).expanduser().resolve()
        allowed = resolved == self.prompt or any(resolved.is_relative_to(d) for d in self.dirs)
        if not allowed:
            raise VoiceNotAllowed(
                f"voice_path {path!r} is not allowed: voice files must lie in a directory "
                "given with --voice-dir or be the --voice-prompt file")
        if not resolved.is_file():
            raise VoiceNotAllowed(f"voice_path {path!r}: no such file")
        return resolved
