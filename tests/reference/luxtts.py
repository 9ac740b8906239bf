"""Reference outputs of the upstream LuxTTS code (ysharma3501/LuxTTS at 381b160: its zipvoice
package; ysharma3501/LinaCodec's vocoder; PyPI vocos 0.1.0) for the tiny random checkpoint of
cake/testing/tiny_luxtts.py, which tests/test_speech_luxtts.py compares cake against. It runs in
its own environment, never cake's:

  python3 -m venv /work/refenv-luxtts
  /work/refenv-luxtts/bin/pip install torch==2.13.0 numpy pyyaml scipy einops safetensors \
      huggingface_hub tensorboard
  /work/refenv-luxtts/bin/pip install --no-deps vocos==0.1.0 torchaudio==2.11.0 encodec==0.1.1
  # torchaudio 2.11's compiled extension is built for CUDA torch 2.11: move its lib/*.so aside;
  # the functions used here (resample, MelSpectrogram) are pure PyTorch and load without it.
  PYTHONPATH=$PWD /work/main/.venv/bin/python cake/testing/tiny_luxtts.py /tmp/lux-tiny
  PYTHONPATH=/work/refsrc-luxtts:/work/refsrc-luxtts/linacodec/src \
      /work/refenv-luxtts/bin/python tests/reference/luxtts.py /tmp/lux-tiny tests/reference/data

with /work/refsrc-luxtts holding the LuxTTS tree and linacodec/src the LinaCodec one. The model
is loaded as LuxTTS's load_models_gpu does (on CPU); the text and prompt token ids are fixed
here (the upstream tokenizer needs piper_phonemize from a non-PyPI index), the initial noise is
fixed and saved, and the prompt clip is a fixed synthetic waveform at 24 kHz.
It writes data/luxtts-reference.npz: the inputs, the flow model's velocity for one call, the
sampled features for 1 and 4 Euler steps, the vocoder's waveform for given features, and the
end-to-end waveform as LuxTTS's generate() makes it, plus the checkpoint's sha256.
"""
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

# linacodec/__init__ imports its codec (wavlm, transformers): load only its vocoder package.
_pkg = types.ModuleType("linacodec")
_pkg.__path__ = [p + "/linacodec" for p in sys.path if Path(p, "linacodec", "vocoder").is_dir()]
sys.modules["linacodec"] = _pkg

from linacodec.vocoder.vocos import Vocos  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402
from zipvoice.models.zipvoice_distill import ZipVoiceDistill  # noqa: E402
from zipvoice.utils.checkpoint import load_checkpoint  # noqa: E402
from zipvoice.utils.feature import VocosFbank  # noqa: E402
from zipvoice.utils.infer import rms_norm  # noqa: E402

FILES = ("config.json", "tokens.txt", "model.pt", "vocoder/config.yaml", "vocoder/vocos.bin")


def generate(prompt_tokens, prompt_lens, prompt_features, prompt_rms, tokens, model, vocoder,
             num_step, guidance_scale, speed, t_shift, target_rms=0.1):
    """zipvoice/modeling_utils.py's generate() restated line for line (that module imports
    librosa, transformers and huggingface pipelines at import time), tokens given as ids."""
    speed = speed * 1.3
    pred_features, _, _, _ = model.sample(
        tokens=[tokens], prompt_tokens=prompt_tokens, prompt_features=prompt_features,
        prompt_features_lens=prompt_lens, speed=speed, t_shift=t_shift, duration="predict",
        num_step=num_step, guidance_scale=guidance_scale)
    pred_features = pred_features.permute(0, 2, 1) / 0.1
    wav = vocoder.decode(pred_features).squeeze(1).clamp(-1, 1)
    if prompt_rms < target_rms:
        wav = wav * (prompt_rms / target_rms)
    return wav


def load(folder: Path):
    """The flow model and vocoder as LuxTTS's load_models_gpu makes them (here on CPU)."""
    cfg = json.loads((folder / "config.json").read_text())
    vocab = sum(1 for line in (folder / "tokens.txt").read_text().splitlines() if line)
    torch.manual_seed(0)
    model = ZipVoiceDistill(**cfg["model"], vocab_size=vocab, pad_id=0)
    load_checkpoint(filename=folder / "model.pt", model=model, strict=True)
    model.eval()
    vocos = Vocos.from_hparams(str(folder / "vocoder" / "config.yaml"))
    parametrize.remove_parametrizations(vocos.upsampler.upsample_layers[0], "weight")
    vocos.load_state_dict(torch.load(folder / "vocoder" / "vocos.bin", map_location="cpu"))
    vocos.eval()
    vocos.freq_range = 12000  # as LuxTTS sets it
    return model, vocos, vocab


def bench(folder: Path, inputs: Path, repeats: int):
    """Time generate() on the inputs cake's benchmark saved (benchmarks/bench_speech_luxtts.py):
    wall and CPU seconds of each run after a warm-up, and the audio, as one JSON line."""
    import time

    model, vocos, _ = load(folder)
    x = np.load(inputs)
    features = torch.from_numpy(x["prompt_features"])[None]
    lens = torch.tensor([features.shape[1]])
    wall, cpu = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            torch.manual_seed(5)
            w0, c0 = time.perf_counter(), time.process_time()
            wave = generate([x["prompt_tokens"].tolist()], lens, features, float(x["rms"]),
                            x["tokens"].tolist(), model, vocos, num_step=int(x["steps"]),
                            guidance_scale=3.0, speed=1.0, t_shift=0.5)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    print(json.dumps({"wall": wall[1:], "cpu": cpu[1:], "audio": wave[0].tolist()}))


def main(folder: Path, out: Path):
    sha = hashlib.sha256()
    for name in FILES:
        sha.update((folder / name).read_bytes())
    model, vocos, vocab = load(folder)

    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, vocab, (8,), generator=g).tolist()
    prompt_tokens = torch.randint(1, vocab, (6,), generator=g).tolist()
    n = 24000 * 3 // 5  # a 0.6 s clip: two tones and a little noise, quiet enough to be raised
    tt = torch.arange(n) / 24000
    clip = 0.004 * (torch.sin(2 * np.pi * 180 * tt) + 0.5 * torch.sin(2 * np.pi * 1250 * tt)
                    + 0.3 * torch.randn(n, generator=g))
    # LuxTTS's process_audio after loading: rms_norm, VocosFbank, * feat_scale
    wav, prompt_rms = rms_norm(clip[None].float(), 0.01)
    prompt_features = VocosFbank().extract(wav, sampling_rate=24000)[None] * 0.1
    prompt_lens = torch.tensor([prompt_features.shape[1]])
    results = {"tokens": np.array(tokens), "prompt_tokens": np.array(prompt_tokens),
               "clip": clip.numpy(), "prompt_rms": np.float32(prompt_rms),
               "prompt_features": prompt_features[0].numpy()}

    with torch.inference_mode():
        text_cond, mask = model.forward_text_inference_ratio_duration(
            [tokens], [prompt_tokens], prompt_lens, speed=1.3)
        frames = text_cond.shape[1]
        noise = torch.randn(1, frames, 100, generator=g)
        speech = torch.nn.functional.pad(prompt_features, (0, 0, 0, frames - prompt_lens[0]))
        results.update(noise=noise[0].numpy())
        v = model.forward_fm_decoder(t=torch.tensor(0.3), xt=noise, text_condition=text_cond,
                                     speech_condition=speech, padding_mask=mask,
                                     guidance_scale=torch.tensor(3.0))
        results["velocity"] = v[0].numpy()
        for steps in (1, 4):
            x = model.solver.sample(x=noise, text_condition=text_cond, speech_condition=speech,
                                    padding_mask=mask, num_step=steps, guidance_scale=3.0,
                                    t_shift=0.5)
            results[f"features_{steps}"] = x[0].numpy()
        mel = torch.randn(1, 100, 16, generator=g) * 2 - 4
        results["vocoder_mel"] = mel[0].numpy()
        results["vocoder_wave"] = vocos.decode(mel)[0].numpy()
        # end to end, as LuxTTS.generate_speech: sample() draws the noise from the global RNG,
        # so seed it and record what it drew.
        torch.manual_seed(5)
        results["e2e_noise"] = torch.randn(1, frames, 100)[0].numpy()
        torch.manual_seed(5)
        wave = generate(torch.tensor([prompt_tokens]).tolist(), prompt_lens, prompt_features,
                        prompt_rms, tokens, model, vocos, num_step=4,
                        guidance_scale=3.0, speed=1.0, t_shift=0.5)
        results["e2e_wave"] = wave[0].numpy()
    results["settings"] = json.dumps({"checkpoint_sha256": sha.hexdigest(), "steps": [1, 4],
                                      "guidance": 3.0, "t_shift": 0.5, "speed": 1.3,
                                      "velocity_t": 0.3, "e2e_seed": 5})
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "luxtts-reference.npz", **results)
    print({k: getattr(v, "shape", v) for k, v in results.items()})


if __name__ == "__main__":
    if sys.argv[1] == "bench":
        torch.set_num_threads(int(sys.argv[5]))
        bench(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
