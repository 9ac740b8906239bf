"""VibeVoice on a tiny random model built offline with transformers (rigged to emit speech
frames): cake's frame loop against transformers' own generate, Microsoft's original checkpoint
layout converted on load, and the model served by a real `cake serve`."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import wave

import httpx
import numpy as np
import pytest
import torch

from conftest import ROOT
from speech_checks import (assert_leaving_client_frees_the_worker,
                           assert_streams_frame_by_frame, speak)
from speech_models import original_name

HOP = 160  # samples per speech frame of the tiny model (downsampling 4 * 5 * 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cake.testing.tiny_vibevoice import write_tiny

    folder = tmp_path_factory.mktemp("vibevoice-tiny")
    return folder, write_tiny(folder)


def voice_wav(rate=44100, channels=2, seconds=0.5, freq=220.0) -> bytes:
    import soundfile

    t = np.arange(int(rate * seconds)) / rate
    x = np.stack([0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)], 1)
    out = io.BytesIO()
    soundfile.write(out, x, rate, format="WAV", subtype="PCM_24")
    return out.getvalue()


def reference_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2",
                                       prediction_type="v_prediction")


def transformers_audio(model, ids, frames, cfg, steps, voice=None, seed=0):
    """Audio from transformers' own VibeVoice generation loop."""
    ids_t = torch.tensor([ids])
    kwargs = {}
    if voice is not None:
        kwargs = {"input_values": voice["input_values"], "padding_mask": voice["padding_mask"]}
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                         max_new_tokens=frames, guidance_scale=cfg, num_diffusion_steps=steps,
                         noise_scheduler=reference_scheduler(), **kwargs)
    return out[0].reshape(-1)


def cake_audio(speech, text, frames, cfg, steps, sample=None, seed=0):
    torch.manual_seed(seed)
    embeds, ids = speech.prompt_embeds(text, sample)
    audio = torch.cat(list(speech.generator.frames(embeds, cfg, steps, frames)))
    return audio, ids


def assert_same_audio(ours, theirs):
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    assert scale > 1e-3  # real signal, so the comparison means something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("cfg", [1.5, 1.0])
def test_frames_match_transformers_generate(tiny, cfg):
    from cake.audio.vibevoice.model import VibeVoiceSpeech

    folder, _ = tiny
    speech = VibeVoiceSpeech.load(folder, "tiny")
    ours, ids = cake_audio(speech, "Hello world, this is a test.", 12, cfg, 5)
    assert ours.shape == (12 * HOP,)
    assert_same_audio(ours, transformers_audio(speech.model, ids, 12, cfg, 5))


def test_cloned_voice_matches_transformers_and_changes_the_audio(tiny):
    from cake.audio.service import load_sample
    from cake.audio.vibevoice.model import SAMPLE_RATE, VibeVoiceSpeech

    folder, _ = tiny
    speech = VibeVoiceSpeech.load(folder, "tiny")
    sample = load_sample(voice_wav(), "test voice")  # 44.1 kHz stereo, resampled to 24 kHz
    ours, ids = cake_audio(speech, "Hello world.", 8, 1.5, 4, sample=sample)
    frames = -(-int(0.5 * SAMPLE_RATE) // HOP)
    assert ids.count(speech.tokens.audio) == frames  # one placeholder per voice frame
    from cake.audio.audio_io import resample

    voice = speech.features(resample(sample.samples, sample.rate, SAMPLE_RATE),
                            sampling_rate=SAMPLE_RATE, return_tensors="pt")
    assert_same_audio(ours, transformers_audio(speech.model, ids, 8, 1.5, 4, voice=voice))
    plain, _ = cake_audio(speech, "Hello world.", 8, 1.5, 4)
    assert not torch.allclose(plain, ours)


def test_language_model_split_into_stages_gives_the_same_audio(tiny):
    from cake.audio.vibevoice.model import VibeVoiceSpeech

    folder, _ = tiny
    whole = VibeVoiceSpeech.load(folder, "tiny")
    split = VibeVoiceSpeech(whole.model, whole.tokenizer, whole.generator.scheduler_args, "tiny",
                            layer_ranges=[(0, 1), (1, 2)])
    assert [(s.start, s.end) for s in split.lm.stages] == [(0, 1), (1, 2)]
    a, _ = cake_audio(whole, "Split me.", 6, 1.5, 3)
    b, _ = cake_audio(split, "Split me.", 6, 1.5, 3)
    torch.testing.assert_close(a, b)


# --- Microsoft's original checkpoint layout ------------------------------------------------
def write_original(model, folder, tokenizer_src):
    from safetensors.torch import save_file

    folder.mkdir()
    tied = model.config.tie_word_embeddings  # a tied checkpoint (1.5B) has no lm_head tensor
    state = {original_name(k): v.clone().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"))
    c = model.config
    tower = lambda t, vae: {  # noqa: E731
        "vae_dim": vae, "encoder_n_filters": t.num_filters, "decoder_n_filters": t.num_filters,
        "encoder_ratios": list(reversed(t.downsampling_ratios)),
        "encoder_depths": "-".join(map(str, t.depths)), "fix_std": 0.5,
        "std_dist_type": "gaussian", "layernorm_eps": t.rms_norm_eps, "causal": True,
        "mixer_layer": "depthwise_conv", "layernorm": "RMSNorm", "disable_last_norm": True}
    text = c.text_config.to_dict()
    config = {
        "model_type": "vibevoice",
        "decoder_config": text,
        "acoustic_tokenizer_config": tower(c.audio_config, c.audio_config.hidden_size),
        "semantic_tokenizer_config": tower(c.semantic_model_config,
                                           c.semantic_model_config.hidden_size),
        "diffusion_head_config": {
            "hidden_size": text["hidden_size"], "head_layers": c.diffusion_head_config.num_hidden_layers,
            "head_ffn_ratio": c.diffusion_head_config.intermediate_size / text["hidden_size"],
            "rms_norm_eps": 1e-5, "latent_size": c.audio_config.hidden_size,
            "prediction_type": "v_prediction", "ddpm_num_steps": 1000,
            "ddpm_beta_schedule": "cosine"},
        "acoustic_vae_dim": c.audio_config.hidden_size,
        "semantic_vae_dim": c.semantic_model_config.hidden_size,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_bytes((tokenizer_src / "tokenizer.json").read_bytes())
    return state


@pytest.fixture(scope="module")
def original(tiny, tmp_path_factory):
    folder, model = tiny
    target = tmp_path_factory.mktemp("orig") / "VibeVoice-tiny-original"
    return target, write_original(model, target, folder)


def test_original_layout_has_microsofts_names(original):
    _, state = original
    for name in ["model.acoustic_tokenizer.encoder.downsample_layers.0.0.conv.conv.weight",
                 "model.acoustic_tokenizer.encoder.stages.0.0.mixer.conv.conv.conv.weight",
                 "model.acoustic_tokenizer.encoder.head.conv.conv.weight",
                 "model.acoustic_tokenizer.decoder.upsample_layers.1.0.convtr.convtr.weight",
                 "model.acoustic_tokenizer.decoder.stages.3.0.ffn.linear1.weight",
                 "model.semantic_tokenizer.encoder.downsample_layers.3.0.conv.conv.bias",
                 "model.acoustic_connector.fc1.weight", "model.semantic_connector.norm.weight",
                 "model.prediction_head.t_embedder.mlp.2.weight",
                 "model.prediction_head.layers.1.adaLN_modulation.1.weight",
                 "model.prediction_head.final_layer.linear.weight",
                 "model.speech_scaling_factor", "model.language_model.norm.weight"]:
        assert name in state, name


def test_original_layout_converts_on_load(tiny, original):
    from cake.audio.vibevoice import checkpoint
    from cake.audio.vibevoice.model import VibeVoiceSpeech

    folder, model = tiny
    target, _ = original
    loaded, scheduler_args, converted = checkpoint.load_model(target, torch.float32, "cpu")
    assert converted and scheduler_args["beta_schedule"] == "squaredcos_cap_v2"
    theirs, ours = model.state_dict(), loaded.state_dict()
    assert set(theirs) == set(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)
    a, _ = cake_audio(VibeVoiceSpeech.load(target, "orig"), "Same weights.", 5, 1.5, 3)
    b, _ = cake_audio(VibeVoiceSpeech.load(folder, "hf"), "Same weights.", 5, 1.5, 3)
    assert_same_audio(a, b)  # equal weights; float rounding may differ with memory layout


def test_cluster_stages_read_the_language_model_of_both_layouts(tiny, original):
    """What a cluster ships and loads: the language model under a text model's names, alike in
    both layouts, and a headless stage built from it computes what the local layers do."""
    from cake.audio.vibevoice.cluster import LanguageModelCheckpoint
    from cake.audio.vibevoice.model import VibeVoiceSpeech
    from cake.cluster.stage import build_stage
    from cake.text.kv_cache import StepBatch

    folder, model = tiny
    target, _ = original
    config = model.config.text_config.to_dict()
    views = [LanguageModelCheckpoint(f, config) for f in (folder, target)]
    names = sorted(views[0].tensor_names())
    assert names == sorted(views[1].tensor_names())
    assert "model.layers.1.mlp.down_proj.weight" in names and "lm_head.weight" in names
    for name in names:
        torch.testing.assert_close(views[1].get(name), views[0].get(name), rtol=0, atol=0)
    speech = VibeVoiceSpeech.load(folder, "hf")
    embeds, ids = speech.prompt_embeds("Split me.")
    positions = [list(range(len(ids)))]
    local = speech.lm.forward(embeds, positions, [0], speech.lm.new_cache(len(ids)))
    stages = [build_stage(views[1], 0, 1, torch.float32, "cpu"),
              build_stage(views[1], 1, 2, torch.float32, "cpu")]
    x = embeds
    with torch.inference_mode():
        for stage in stages:
            cache = speech.lm.new_cache(len(ids))
            x = stage(x, StepBatch.make(positions, [0], "cpu"), cache)
        ringed = speech.lm.norm(x[:, -1])
    torch.testing.assert_close(ringed, local, rtol=1e-5, atol=1e-5)


def test_tied_original_checkpoint_without_a_head_loads_tied(tmp_path):
    from cake.audio.vibevoice import checkpoint
    from cake.testing import tiny_vibevoice as random_model

    tokenizer = random_model.write_tokenizer(tmp_path / "tok")
    model = random_model.build(random_model.tiny_config(tokenizer, tie_word_embeddings=True),
                               speaking=False)
    state = write_original(model, tmp_path / "orig", tmp_path / "tok")
    assert "lm_head.weight" not in state
    loaded, _, _ = checkpoint.load_model(tmp_path / "orig", torch.float32, "cpu")
    embed = loaded.model.language_model.embed_tokens.weight
    assert loaded.lm_head.weight.data_ptr() == embed.data_ptr()
    torch.testing.assert_close(embed, model.model.language_model.embed_tokens.weight)


def test_wrong_checkpoints_fail_clearly(original, tmp_path):
    from safetensors.torch import load_file, save_file

    from cake.audio.vibevoice import checkpoint

    target, _ = original
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((target / "config.json").read_bytes())
    state = load_file(str(target / "model.safetensors"))
    state["model.prediction_head.mystery.weight"] = state.pop("model.prediction_head.cond_proj.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(checkpoint.UnsupportedCheckpoint, match="cond_proj.*mystery"):
        checkpoint.load_model(broken, torch.float32, "cpu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(checkpoint.UnsupportedCheckpoint, match="'llama' is not VibeVoice"):
        checkpoint.load_model(other, torch.float32, "cpu")


# --- served ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    d = tmp_path_factory.mktemp("voices")
    (d / "alice.wav").write_bytes(voice_wav(freq=200))
    (d / "notes.wav").write_bytes(b"this is not audio")
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "bob.wav").write_bytes(voice_wav(freq=300))
    (outside / "prompt.wav").write_bytes(voice_wav(rate=16000, channels=1, freq=260))
    (d / "link.wav").symlink_to(outside / "bob.wav")
    return d, outside


@pytest.fixture(scope="module")
def server(start_server, tiny, voices):
    folder, _ = tiny
    d, outside = voices
    return start_server(str(folder), "--model-type", "audio-model", "--voice-dir", str(d),
                        "--voice-prompt", str(outside / "prompt.wav"))


def wav_of(r: httpx.Response):
    assert r.status_code == 200, r.text
    with wave.open(io.BytesIO(r.content)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def test_served_wav_and_pcm(server):
    assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == [
        server_model_id(server)]
    assert len(wav_of(speak(server, input="Hello there.", max_frames=5))) == 5 * HOP
    r = speak(server, input="Hello there.", max_frames=3, response_format="pcm", seed=3)
    assert r.headers["content-type"] == "audio/pcm" and r.headers["x-sample-rate"] == "24000"
    pcm = np.frombuffer(r.content, "<f4")
    assert len(pcm) == 3 * HOP and np.isfinite(pcm).all() and np.abs(pcm).max() > 0
    again = speak(server, input="Hello there.", max_frames=3, response_format="pcm", seed=3)
    assert again.content == r.content  # a seed makes it reproducible


def server_model_id(server) -> str:
    return re.search(r"serving (\S+) at", server.output())[1]


def test_every_way_to_give_a_voice(server, voices):
    d, outside = voices
    base = dict(input="Clone me.", max_frames=4, response_format="pcm", seed=1)
    default = speak(server, **base).content  # the --voice-prompt sample
    by_data = speak(server, **base, voice_data=base64.b64encode(voice_wav(freq=200)).decode())
    by_name = speak(server, **base, voice="alice")
    by_path = speak(server, **base, voice_path=str(d / "alice.wav"))
    by_prompt_path = speak(server, **base, voice_path=str(outside / "prompt.wav"))
    assert by_data.status_code == by_name.status_code == by_path.status_code == 200
    assert by_data.content == by_name.content == by_path.content  # the same sample
    assert by_prompt_path.content == default
    assert by_name.content != default  # the sample shapes the speech
    openai_name = speak(server, **base, voice="alloy")  # OpenAI's names: the default voice
    assert openai_name.content == default


@pytest.mark.parametrize("extra, message", [
    ({"voice_path": "/etc/passwd"}, "is not allowed"),
    ({"voice_path": "VOICES/../OUTSIDE_NAME/bob.wav"}, "is not allowed"),
    ({"voice_path": "OUTSIDE/bob.wav"}, "is not allowed"),
    ({"voice_path": "VOICES/link.wav"}, "is not allowed"),  # a symlink leading out
    ({"voice_path": "VOICES/missing.wav"}, "no such file"),
    ({"voice_path": "VOICES/notes.wav"}, "not a readable audio file"),
    ({"voice": "notes"}, "not a readable audio file"),
    ({"voice": "carol"}, "unknown voice 'carol'"),
    ({"voice_data": base64.b64encode(b"hello, not a wav").decode()}, "not a readable audio file"),
    ({"voice_data": "%%%"}, "not valid base64"),
    ({"voice_data": "", "voice_path": "x"}, "either voice_data or voice_path"),
    ({"speed": 1.5}, "speed is not supported by VibeVoice"),
    ({"max_frames": 40000}, "context holds 8192"),
    ({"diffusion_steps": 0}, "diffusion_steps must be between 1 and 100"),
])
def test_voice_and_parameter_errors(server, voices, extra, message):
    d, outside = voices
    if "voice_path" in extra:
        extra["voice_path"] = (extra["voice_path"].replace("VOICES", str(d))
                               .replace("OUTSIDE_NAME", outside.name)
                               .replace("OUTSIDE", str(outside)))
    r = speak(server, **{"input": "hi", "max_frames": 2, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_stream_arrives_frame_by_frame(server):
    assert_streams_frame_by_frame(server, 6, HOP)


def test_server_answers_during_synthesis_and_a_leaving_client_stops_it(server):
    assert_leaving_client_frees_the_worker(server, HOP, diffusion_steps=100)


def test_cake_run_with_vibevoice(tiny, voices, tmp_path):
    folder, _ = tiny
    d, _ = voices
    out = tmp_path / "out.wav"
    proc = subprocess.run([sys.executable, "-m", "cake", "run", str(folder),
                           "Hello from the command line.", "--model-type", "audio-model",
                           "--audio-output",
                           str(out), "--max-frames", "4", "--voice-dir", str(d), "--voice",
                           "alice"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (24000, 1, 4 * HOP)
