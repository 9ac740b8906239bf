"""LuxTTS's text frontend for English: espeak-ng phonemes (through piper-tts's bundled espeak,
the same library k2-fsa's piper_phonemize wraps), decomposed into code points and looked up in
the checkpoint's tokens.txt. Chinese and <pinyin> need jieba and pypinyin, which cake does not
install: such text is refused with a message saying so."""
from __future__ import annotations

import re
import threading
from pathlib import Path

# The reference's punctuation mapping (full-width to ASCII, ellipses to one character).
PUNCTUATION = {"，": ",", "。": ".", "！": "!", "？": "?", "；": ";", "：": ":", "、": ",",
               "‘": "'", "“": '"', "”": '"', "’": "'", "⋯": "…", "···": "…", "・・・": "…",
               "...": "…"}
CJK = re.compile(r"[\u4e00-\u9fa5]")
SPECIAL = re.compile(r"(\[[^\]]*\]|<[^>]*>)")
_espeak_lock = threading.Lock()  # espeak-ng keeps one global voice and state


def read_tokens(path: Path) -> dict[str, int]:
    """tokens.txt: '{token}\\t{id}' per line."""
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        token, _, index = line.rstrip("\n").rpartition("\t")
        if not index.isdigit():
            raise ValueError(f"{path}: expected 'token<TAB>id', got {line!r}")
        table[token] = int(index)
    if "_" not in table:
        raise ValueError(f"{path} has no padding token '_'")
    return table


class Phonemizer:
    def __init__(self, tokens: dict[str, int], lang: str = "en-us"):
        self.tokens, self.lang = tokens, lang
        self.pad_id = tokens["_"]
        self._espeak = None

    def phonemes(self, text: str) -> list[str]:
        for a, b in PUNCTUATION.items():
            text = text.replace(a, b)
        if CJK.search(text):
            raise ValueError("LuxTTS text with Chinese characters needs a Chinese frontend "
                             "(jieba + pypinyin) that cake does not include; English works")
        out: list[str] = []
        for part in SPECIAL.split(text):
            if not part:
                continue
            if part.startswith("<"):
                raise ValueError(f"pinyin {part} needs the Chinese frontend (pypinyin), which "
                                 "cake does not include")
            if part.startswith("["):
                out.append(part)  # a tag token, such as [laughter]
            elif re.search(r"[A-Za-z]", part):
                out.extend(self._espeak_phonemes(part))
        return out

    def _espeak_phonemes(self, text: str) -> list[str]:
        with _espeak_lock:
            if self._espeak is None:
                try:
                    from piper.phonemize_espeak import EspeakPhonemizer
                except ImportError:
                    raise ValueError("LuxTTS needs espeak-ng phonemes: install piper-tts "
                                     "(pip install 'cake[audio]')") from None
                self._espeak = EspeakPhonemizer()
            sentences = self._espeak.phonemize(self.lang, text)
        return [p for sentence in sentences for p in sentence]

    def ids(self, text: str) -> list[int]:
        """Token ids; phonemes the checkpoint has no token for are skipped, as the reference
        does."""
        return [self.tokens[p] for p in self.phonemes(text) if p in self.tokens]
