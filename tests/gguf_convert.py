"""llama.cpp's own HF-to-GGUF converter, for tests that need a GGUF written the way real ones
are (not by a mapping of ours that would share our mistakes). `make install-test` unpacks it
from the llama-cpp-python 0.3.36 sdist into $VENV/llama.cpp; ~/.cache/cake/llama.cpp works too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The converter imports sentencepiece before it looks for tokenizer.model; these test models
# have a tokenizer.json only, so it never uses it (as with the real package installed).
_RUNNER = """
import importlib.machinery, runpy, sys, types
sp = types.ModuleType("sentencepiece")
sp.__spec__ = importlib.machinery.ModuleSpec("sentencepiece", None)
sp.SentencePieceProcessor = type("SentencePieceProcessor", (), {})
sys.modules.setdefault("sentencepiece", sp)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def converter_dir() -> Path:
    for d in (os.environ.get("CAKE_LLAMA_CPP"), Path(sys.prefix) / "llama.cpp",
              Path.home() / ".cache" / "cake" / "llama.cpp"):
        if d and (Path(d) / "convert_hf_to_gguf.py").exists():
            return Path(d)
    if os.environ.get("CI") == "true":
        pytest.fail("llama.cpp's convert_hf_to_gguf.py is missing (make install-test unpacks it)")
    pytest.skip("llama.cpp's convert_hf_to_gguf.py is not installed (make install-test)")


def convert(folder: Path, out: Path, outtype: str = "f32", *extra: str) -> Path:
    """convert_hf_to_gguf.py folder --outfile out --outtype outtype [extra options]."""
    src = converter_dir()
    # The GPT-2 style vocabulary path of the converter (these folders carry tokenizer.json).
    config = folder / "tokenizer_config.json"
    tok = json.loads(config.read_text())
    config.write_text(json.dumps({**tok, "tokenizer_class": "GPT2Tokenizer"}))
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(src / "convert_hf_to_gguf.py"),
                           str(folder), "--outfile", str(out), "--outtype", outtype, *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-4000:]}")
    return out
