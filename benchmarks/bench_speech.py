"""VibeVoice: milliseconds per speech frame, cake's frame loop against transformers' own
generate() on the same random-weight model, in the same run.

    python benchmarks/bench_speech.py --size tiny               # seconds, any machine
    python benchmarks/bench_speech.py --size 0.5b --frames 20   # Qwen2.5-0.5B-shaped language model
    python benchmarks/bench_speech.py --size 1.5b --device cuda # VibeVoice-1.5B's shape

Weights are random (nothing is downloaded); the model is rigged to emit a speech frame at
every step (cake/testing/tiny_vibevoice.py) so both loops make exactly --frames frames.
Both draw the same random numbers, and the script checks they produce the same audio.
Prints one JSON line per run and the median of --repeats timed runs after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cake.testing import tiny_vibevoice as random_model  # noqa: E402
from cake.audio.vibevoice.model import VibeVoiceSpeech  # noqa: E402

SIZES = {  # language-model shapes; towers and diffusion head as in VibeVoice-1.5B except tiny
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5b": {},
}


def build(size: str, folder: Path, device: str, dtype: torch.dtype):
    tokenizer = random_model.write_tokenizer(folder)
    if size == "tiny":
        config = random_model.tiny_config(tokenizer)
    else:
        config = random_model.real_config(vocab_size=151936)
        for k, v in {**SIZES[size], "tie_word_embeddings": False}.items():
            setattr(config.text_config, k, v)
        config.diffusion_head_config.hidden_size = config.text_config.hidden_size
        config.tie_word_embeddings = False
        ids = {t: tokenizer.token_to_id(t) for t in random_model.SPECIAL_TOKENS}
        config.eos_token_id = config.pad_token_id = ids["<|endoftext|>"]
        config.audio_bos_token_id = ids["<|vision_start|>"]
        config.audio_eos_token_id = ids["<|vision_end|>"]
        config.audio_token_id = ids["<|vision_pad|>"]
    with torch.device(device):
        model = random_model.build(config, dtype=dtype)
    return VibeVoiceSpeech(model, tokenizer, {"beta_schedule": "squaredcos_cap_v2",
                                              "prediction_type": "v_prediction"}, size)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_cake(speech, embeds, args):
    torch.manual_seed(0)
    audio = list(speech.generator.frames(embeds, args.cfg, args.steps, args.frames))
    return torch.cat(audio).float().cpu()


def run_transformers(speech, ids, args):
    from diffusers import DPMSolverMultistepScheduler

    ids_t = torch.tensor([ids], device=speech.lm.device)
    torch.manual_seed(0)
    out = speech.model.generate(
        input_ids=ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=args.frames,
        guidance_scale=args.cfg, num_diffusion_steps=args.steps,
        noise_scheduler=DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2",
                                                    prediction_type="v_prediction"))
    return out[0].reshape(-1).float().cpu()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=["tiny", *SIZES], default="tiny")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--steps", type=int, default=10, help="diffusion steps per frame")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["f32", "bf16"], default=None)
    p.add_argument("--text", default="Hello world, this is a benchmark of speech synthesis.")
    args = p.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("f32" if args.device == "cpu" else "bf16")]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        speech = build(args.size, Path(tmp), args.device, dtype)
    embeds, ids = speech.prompt_embeds(args.text)
    ours = lambda: run_cake(speech, embeds, args)  # noqa: E731
    theirs = lambda: run_transformers(speech, ids, args)  # noqa: E731
    _, a = timed(ours, args.device)  # warm-up, and the audio for the check
    _, b = timed(theirs, args.device)
    same = a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-3 * b.abs().max().item())
    times = {"cake": [], "transformers": []}
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        times["cake"].append(timed(ours, args.device)[0])
        times["transformers"].append(timed(theirs, args.device)[0])
    ms = {k: 1000 * statistics.median(v) / args.frames for k, v in times.items()}
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"cpu x{torch.get_num_threads()} threads")
    result = {"size": args.size, "device": device_name, "dtype": str(dtype).split(".")[1],
              "frames": args.frames, "diffusion_steps": args.steps, "cfg_scale": args.cfg,
              "cake_ms_per_frame": round(ms["cake"], 2),
              "transformers_ms_per_frame": round(ms["transformers"], 2),
              "speedup": round(ms["transformers"] / ms["cake"], 2), "same_audio": bool(same)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
