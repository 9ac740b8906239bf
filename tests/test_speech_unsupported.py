"""Speech checkpoints that do not load (a LuxTTS folder with empty files, a VibeVoice-Realtime
folder without its weights): `cake serve` and `cake run` end with one line naming what is
wrong, not a traceback from the loader."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port


def luxtts_folder(path):
    """The files of YatharthS/LuxTTS (k2-fsa's ZipVoice layout plus a vocoder folder)."""
    (path / "vocoder").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model": {"fm_decoder_downsampling_factor": [1, 2, 4, 2, 1], "text_encoder_dim": 192},
        "feature": {"sampling_rate": 24000, "type": "vocos"}}))
    for name in ("tokens.txt", "model.pt", "vocoder/config.yaml", "vocoder/vocos.bin"):
        (path / name).write_bytes(b"")
    return path


def realtime_folder(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "vibevoice_streaming"}))
    return path


def cake(*args):
    return subprocess.run([sys.executable, "-m", "cake", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


LUXTTS = r"tokens\.txt has no padding token"
REALTIME = r"config\.json lacks decoder_config and acoustic_tokenizer_config"


@pytest.mark.parametrize("make, message, command", [
    (luxtts_folder, LUXTTS, "serve"), (realtime_folder, REALTIME, "serve"),
    (luxtts_folder, LUXTTS, "run"),
])
def test_unservable_speech_checkpoint_is_named(tmp_path, make, message, command):
    import re

    folder = make(tmp_path / "model")
    args = ["--api", f"127.0.0.1:{free_port()}"] if command == "serve" else ["Hello."]
    out = cake(command, str(folder), *args, "--model-type", "audio-model")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cake: ") and re.search(message, last), out.stderr


def test_vibevoice_and_piper_folders_are_not_taken_for_luxtts(tmp_path):
    from cake.audio.luxtts.checkpoint import is_luxtts

    vibevoice = tmp_path / "vibevoice"
    vibevoice.mkdir()
    (vibevoice / "config.json").write_text(json.dumps({"model_type": "vibevoice"}))
    (vibevoice / "tokens.txt").write_text("")  # a tokens file alone does not make it ZipVoice
    assert not is_luxtts(vibevoice)
    assert is_luxtts(luxtts_folder(tmp_path / "lux"))
