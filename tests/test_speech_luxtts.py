"""LuxTTS on a tiny random checkpoint (cake/testing/tiny_luxtts.py): cake's own implementation
against the outputs of the upstream LuxTTS/ZipVoice/LinaCodec code for the same checkpoint,
inputs and initial noise (made by tests/reference/luxtts.py in a separate environment); weights
read safely; and the model served by a real `cake serve` and run by `cake run`."""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import threading
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import ROOT

DATA = Path(__file__).parent / "reference" / "data"
REFERENCE = np.load(DATA / "luxtts-reference.npz")
SETTINGS = json.loads(str(REFERENCE["settings"]))
# Everything is float32 on both sides; the bound is relative to the largest reference value.
# Measured here: 5e-7 (velocity, features), 3e-7 (vocoder), 8e-7 (end to end).
BOUND = 1e-5


def assert_close(ours, reference):
    ours = np.asarray(ours)
    assert ours.shape == reference.shape
    scale = float(np.abs(reference).max())
    assert scale > 0
    assert float(np.abs(ours - reference).max()) <= BOUND * scale


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cake.testing.tiny_luxtts import write_luxtts

    folder = tmp_path_factory.mktemp("luxtts-tiny")
    # The reference outputs were made from this very checkpoint.
    assert write_luxtts(folder) == SETTINGS["checkpoint_sha256"]
    return folder


@pytest.fixture(scope="module")
def speech(tiny):
    from cake.audio.luxtts.speech import LuxTTSSpeech

    return LuxTTSSpeech.load(tiny, "tiny", device="cpu")


@pytest.fixture(scope="module")
def conditions(speech):
    flow = speech.flow
    tokens, prompt = REFERENCE["tokens"].tolist(), REFERENCE["prompt_tokens"].tolist()
    features = torch.from_numpy(REFERENCE["prompt_features"])[None]
    frames = flow.frame_count(len(tokens), len(prompt), features.shape[1], SETTINGS["speed"])
    assert frames == REFERENCE["noise"].shape[0]
    text = flow.text_condition(prompt + tokens, frames)
    cond = torch.nn.functional.pad(features, (0, 0, 0, frames - features.shape[1]))
    return text, cond, torch.from_numpy(REFERENCE["noise"])[None]


def test_prompt_features_match_the_reference(speech):
    clip = REFERENCE["clip"]
    features, rms = speech.prompt(clip, 24000)
    assert rms == pytest.approx(float(REFERENCE["prompt_rms"]), rel=1e-6)
    assert_close(features[0], REFERENCE["prompt_features"])


def test_velocity_and_euler_steps_match_the_reference(speech, conditions):
    text, cond, noise = conditions
    with torch.inference_mode():
        v = speech.flow.velocity(torch.tensor(SETTINGS["velocity_t"]), noise, text, cond,
                                 torch.tensor(SETTINGS["guidance"]))
    assert_close(v[0], REFERENCE["velocity"])
    for steps in SETTINGS["steps"]:
        x = speech.flow.sample(noise, text, cond, steps, SETTINGS["guidance"],
                               SETTINGS["t_shift"])
        assert_close(x[0], REFERENCE[f"features_{steps}"])


def test_vocoder_and_end_to_end_match_the_reference(speech):
    with torch.inference_mode():
        wave_ = speech.vocoder(torch.from_numpy(REFERENCE["vocoder_mel"])[None])
    assert_close(wave_[0], REFERENCE["vocoder_wave"])
    out = speech.generate(REFERENCE["tokens"].tolist(), REFERENCE["prompt_tokens"].tolist(),
                          torch.from_numpy(REFERENCE["prompt_features"])[None],
                          float(REFERENCE["prompt_rms"]), 4, SETTINGS["guidance"], 1.0,
                          noise=torch.from_numpy(REFERENCE["e2e_noise"])[None])
    assert_close(out, REFERENCE["e2e_wave"])


class Evil:
    """A pickle that runs code when loaded unsafely: it would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_weights_are_read_without_unpickling_code(tiny, tmp_path):
    import shutil

    from cake.audio.luxtts.checkpoint import CheckpointError, load

    folder = tmp_path / "evil"
    shutil.copytree(tiny, folder)
    marker = tmp_path / "ran"
    torch.save({"model": Evil(marker)}, folder / "model.pt")
    with pytest.raises(CheckpointError, match="not a tensors-only checkpoint"):
        load(folder)
    assert not marker.exists()


def test_english_text_becomes_espeak_phonemes(speech):
    assert speech.phonemizer.phonemes("Hello world.")[:6] == ["h", "ə", "l", "ˈ", "o", "ʊ"]
    with pytest.raises(ValueError, match="Chinese frontend"):
        speech.phonemizer.ids("你好")


# --- served ---------------------------------------------------------------------------------
def clip_wav(rate: int = 16000, seconds: float = 1.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    samples = 0.2 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def voice_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lux-voices")
    (d / "anna.wav").write_bytes(clip_wav())
    (d / "anna.txt").write_text("Hello world, how are you?\n")
    (d / "mute.wav").write_bytes(clip_wav())  # no transcript beside it
    return d


@pytest.fixture(scope="module")
def server(start_server, tiny, voice_dir):
    return start_server(str(tiny), "--model-type", "audio-model", "--voice-dir", str(voice_dir))


def speak(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/audio/speech", json=body, timeout=120)


def test_served_wav_is_24k_and_cloned_from_voice_data(server, speech):
    r = speak(server, input="This is a test.", voice_data=base64.b64encode(clip_wav()).decode(),
              voice_text="Hello world, how are you?", seed=3, response_format="pcm")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/pcm" and r.headers["x-sample-rate"] == "24000"
    served = np.frombuffer(r.content, "<f4")
    # the same request in this process: the server adds nothing and loses nothing
    from cake.audio.service import SpeechRequest, load_sample

    sample = load_sample(clip_wav(), "clip")
    sample.text = "Hello world, how are you?"
    req = SpeechRequest(text="This is a test.", sample=sample, seed=3, cfg_scale=3.0,
                        diffusion_steps=4)
    mine = np.concatenate(list(speech.synthesize(req, lambda: False)))
    np.testing.assert_allclose(served, mine, atol=1e-6)
    r = speak(server, input="This is a test.", voice="anna")
    assert r.status_code == 200, r.text
    with wave.open(io.BytesIO(r.content)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() > 0 and w.getnframes() % 256 == 0


@pytest.mark.parametrize("extra, message", [
    ({}, "clones a voice: send voice_data or voice_path"),
    ({"voice": "mute"}, "needs the words spoken in the voice sample"),
    ({"voice_text": "Hi."}, "voice_text is the transcript of a voice sample"),
    ({"voice": "anna", "input": "你好"}, "Chinese frontend"),
    ({"voice_data": "not base64!"}, "voice_data is not valid base64"),
    ({"voice": "anna", "cfg_scale": 9.0}, "cfg_scale must be between"),
    ({"voice_path": "/etc/passwd"}, "is not allowed"),
])
def test_voice_and_parameter_errors(server, extra, message):
    r = speak(server, **{"input": "hi", **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_stream_arrives_in_chunks_from_voice_path(server, voice_dir):
    body = {"input": "Stream me please.", "voice_path": str(voice_dir / "anna.wav"),
            "stream": True, "response_format": "pcm", "seed": 1}
    with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=120, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
        parts = list(r.iter_bytes())
    whole = speak(server, **{**body, "stream": False})
    assert b"".join(parts) == whole.content
    with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=120,
                      json={**body, "response_format": "wav"}) as r:
        streamed = b"".join(r.iter_bytes())
    assert struct.unpack("<4sI", streamed[:8]) == (b"RIFF", 0xFFFFFFFF)
    assert len(streamed) - 44 == len(whole.content) // 2


def test_a_leaving_client_stops_its_synthesis(server):
    """A long text at 100 Euler steps takes minutes here; the client gives up after a
    second; the next request is served soon after, so the worker was freed."""
    try:
        httpx.post(server.url + "/v1/audio/speech", timeout=1.0,
                   json={"input": "A long one. " * 150, "voice": "anna",
                         "diffusion_steps": 100})
    except httpx.TimeoutException:
        pass
    done, result = threading.Event(), {}

    def follow_up():
        result["r"] = speak(server, input="Next.", voice="anna", response_format="pcm")
        done.set()

    threading.Thread(target=follow_up, daemon=True).start()
    assert done.wait(timeout=60), "the abandoned synthesis kept the worker busy"
    assert result["r"].status_code == 200 and len(result["r"].content) > 0


def test_cake_run_writes_the_audio(tiny, voice_dir, tmp_path):
    out = tmp_path / "out.wav"
    proc = subprocess.run([sys.executable, "-m", "cake", "run", str(tiny), "Hello from the "
                           "command line.", "--model-type", "audio-model", "--audio-output",
                           str(out), "--voice-prompt", str(voice_dir / "mute.wav"),
                           "--voice-text", "Hello world."], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels()) == (24000, 1) and w.getnframes() > 0
