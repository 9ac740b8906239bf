"""VibeVoice-Realtime on a tiny random checkpoint (tests/speech_models.py): cake's own
implementation against the audio of Microsoft's reference implementation for the same
checkpoint, voice preset and seed (made by tests/reference/vibevoice_realtime.py in a
separate environment), voice presets read safely, and the model served by a real
`cake serve` and run by `cake run`."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from speech_checks import (assert_leaving_client_frees_the_worker,
                           assert_streams_frame_by_frame, speak)
from speech_models import write_realtime

HOP = 160  # samples per frame of the tiny model (8 * 5 * 4)
DATA = Path(__file__).parent / "reference" / "data"
REFERENCE = np.load(DATA / "realtime-audio.npz")
SETTINGS = json.loads(str(REFERENCE["settings"]))


class Evil:
    """A pickle that runs code when loaded unsafely: it would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("realtime-tiny")
    # The reference audio was made from this very checkpoint.
    assert write_realtime(folder) == SETTINGS["checkpoint_sha256"]
    (folder / "voices").mkdir()
    shutil.copy(DATA / "realtime-voice.pt", folder / "voices" / "carter.pt")
    return folder


@pytest.fixture(scope="module")
def speech(tiny):
    from cake.audio.vibevoice.realtime import VibeVoiceRealtimeSpeech

    return VibeVoiceRealtimeSpeech.load(tiny, "tiny")


def cake_audio(speech, cfg: float, max_frames: int) -> np.ndarray:
    torch.manual_seed(SETTINGS["seed"])
    preset = speech.preset("carter")
    frames = speech.frames(preset, speech.text_ids(SETTINGS["text"]), cfg, SETTINGS["steps"],
                           max_frames)
    return torch.cat(list(frames)).numpy()


def assert_same_audio(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 1e-3  # real signal, so the comparison means something
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("case, cfg", [("guided", 1.5), ("plain", 1.0)])
def test_audio_matches_microsofts_reference(speech, case, cfg):
    reference = REFERENCE[case]
    assert len(reference) == 21 * HOP  # 4 text windows and their speech frames, and more
    assert_same_audio(cake_audio(speech, cfg, len(reference) // HOP), reference)


def test_end_of_speech_classifier_stops_as_the_reference_does(speech):
    bias = speech.model.tts_eos_classifier.fc2.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(8.0)  # as the reference run did: it fires after the first frame
        assert_same_audio(cake_audio(speech, 1.5, 50), REFERENCE["ended"])
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_presets_load_without_running_pickled_code(tmp_path):
    from cake.audio.vibevoice.presets import PresetError, load_preset

    marker = tmp_path / "ran"
    torch.save({"lm": Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(PresetError, match="cannot be read safely"):
        load_preset(tmp_path / "evil.pt")
    assert not marker.exists()
    preset = load_preset(DATA / "realtime-voice.pt")  # Microsoft's format, DynamicCache and all
    assert preset.tts.length == preset.lm.length + 3 and preset.neg_tts.length == 1


def test_presets_saved_by_transformers_5_load_too(tmp_path):
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from cake.audio.vibevoice.presets import load_preset

    parts = {}
    for name, length in (("lm", 4), ("tts_lm", 6), ("neg_tts_lm", 1)):
        cache = DynamicCache()
        for layer in range(2):
            cache.update(torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 16), layer)
        parts[name] = BaseModelOutputWithPast(last_hidden_state=torch.randn(1, length, 64),
                                              past_key_values=cache)
    torch.save(parts, tmp_path / "new.pt")
    preset = load_preset(tmp_path / "new.pt")
    assert (preset.lm.length, preset.tts.length, preset.neg_tts.length) == (4, 6, 1)
    keys, _ = preset.tts.layers[1]
    torch.testing.assert_close(keys, parts["tts_lm"].past_key_values.layers[1].keys[0])
    torch.testing.assert_close(preset.tts.last_hidden, parts["tts_lm"].last_hidden_state[0, -1])
    assert preset.tts.layers[0][0].shape == (2, preset.tts.length, 16)


# --- served ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voice_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("presets")
    shutil.copy(DATA / "realtime-voice.pt", d / "emma.pt")
    torch.save({"lm": Evil(d / "ran")}, d / "evil.pt")
    return d


@pytest.fixture(scope="module")
def server(start_server, tiny, voice_dir):
    return start_server(str(tiny), "--model-type", "audio-model", "--voice-dir", str(voice_dir))


def test_served_pcm_is_the_reference_audio_and_wav_is_24k(server):
    r = speak(server, input=SETTINGS["text"], response_format="pcm", seed=SETTINGS["seed"],
              cfg_scale=1.5, diffusion_steps=SETTINGS["steps"], max_frames=21)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/pcm" and r.headers["x-sample-rate"] == "24000"
    assert_same_audio(np.frombuffer(r.content, "<f4"), REFERENCE["guided"])
    r = speak(server, input="Hello there.", max_frames=5, voice="emma")
    assert r.status_code == 200, r.text
    with wave.open(io.BytesIO(r.content)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() == 5 * HOP


@pytest.mark.parametrize("extra, message", [
    ({"voice": "nobody"}, "unknown voice 'nobody'; this server has carter, emma, evil"),
    ({"voice": "evil"}, "cannot be read safely"),
    ({"voice_data": "UklGRg=="}, "cannot clone a voice"),
    ({"speed": 1.5}, "speed is not supported"),
    ({"max_frames": 40000}, "context holds 8192"),
])
def test_voice_and_parameter_errors(server, voice_dir, extra, message):
    r = speak(server, **{"input": "hi", "max_frames": 2, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert not (voice_dir / "ran").exists()


def test_stream_arrives_frame_by_frame(server):
    assert_streams_frame_by_frame(server, 7, HOP)


def test_a_leaving_client_stops_its_synthesis(server):
    assert_leaving_client_frees_the_worker(server, HOP, diffusion_steps=100)


def test_cake_run_writes_the_audio(tiny, voice_dir, tmp_path):
    out = tmp_path / "out.wav"
    proc = subprocess.run([sys.executable, "-m", "cake", "run", str(tiny), "Hello from the "
                           "command line.", "--model-type", "audio-model", "--audio-output",
                           str(out), "--max-frames", "4", "--voice-dir", str(voice_dir),
                           "--voice", "emma"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (24000, 1, 4 * HOP)
