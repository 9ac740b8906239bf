"""LuxTTS: milliseconds of compute per second of 48 kHz audio, cake's implementation against
the upstream LuxTTS code (zipvoice + LinaCodec's Vocos) on the same random checkpoint, tokens,
reference-clip features and initial noise, on this machine in the same run.

    python benchmarks/bench_speech_luxtts.py --threads 1 --repeats 3 [--real-size]

The reference runs in its own environment (tests/reference/luxtts.py says how to make it and
where its source goes), in a child process; cake runs here. Both sides run generate() the way
LuxTTS's generate_speech does (4 Euler steps, guidance 3, t_shift 0.5) on --tokens random
phoneme ids after a --prompt-seconds clip, with --threads torch threads; each reports the
median of --repeats timed runs after a warm-up, in wall time and in CPU time of its process.
The script checks that both made the same audio (to 1e-4 of the peak) and prints one JSON line.
--real-size uses LuxTTS's shape (ZipVoice's default dimensions, a 512-wide 8-block Vocos) with
random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cake.audio.luxtts.features import log_mel  # noqa: E402
from cake.audio.luxtts.speech import FEAT_SCALE, SPEED_FACTOR, LuxTTSSpeech  # noqa: E402
from cake.testing.tiny_luxtts import write_luxtts  # noqa: E402


def inputs(speech: LuxTTSSpeech, tokens: int, prompt_seconds: float, steps: int) -> dict:
    g = torch.Generator().manual_seed(3)
    vocab = len(speech.phonemizer.tokens)
    n = int(24000 * prompt_seconds)
    t = torch.arange(n) / 24000
    clip = 0.05 * torch.sin(2 * np.pi * 180 * t) + 0.01 * torch.randn(n, generator=g)
    rms = float(torch.sqrt(torch.mean(clip ** 2)))
    return {"tokens": torch.randint(1, vocab, (tokens,), generator=g).numpy(),
            "prompt_tokens": torch.randint(1, vocab, (max(4, tokens // 8),), generator=g).numpy(),
            "prompt_features": (log_mel(clip) * FEAT_SCALE).numpy(), "rms": np.float32(rms),
            "steps": np.int64(steps)}


def cake(speech: LuxTTSSpeech, x: dict, repeats: int) -> tuple[list, list, np.ndarray]:
    features = torch.from_numpy(x["prompt_features"])[None]
    tokens, prompt = x["tokens"].tolist(), x["prompt_tokens"].tolist()
    frames = speech.flow.frame_count(len(tokens), len(prompt), features.shape[1], SPEED_FACTOR)
    wall, cpu = [], []
    for _ in range(repeats + 1):
        torch.manual_seed(5)  # the reference's noise: its sample() draws it first thing
        noise = torch.randn(1, frames, 100)
        w0, c0 = time.perf_counter(), time.process_time()
        audio = speech.generate(tokens, prompt, features, float(x["rms"]), int(x["steps"]),
                                3.0, 1.0, noise=noise)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall[1:], cpu[1:], audio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-python", default="/work/refenv-luxtts/bin/python")
    p.add_argument("--reference-src", default="/work/refsrc-luxtts",
                   help="the LuxTTS tree, with LinaCodec's under linacodec/src")
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--prompt-seconds", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--real-size", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "luxtts"
        write_luxtts(folder, real_size=args.real_size)
        speech = LuxTTSSpeech.load(folder, "bench", device="cpu")
        x = inputs(speech, args.tokens, args.prompt_seconds, args.steps)
        np.savez(Path(tmp) / "inputs.npz", **x)
        env = {**os.environ, "PYTHONPATH": f"{args.reference_src}:"
               f"{args.reference_src}/linacodec/src"}
        out = subprocess.run([args.reference_python, str(ROOT / "tests/reference/luxtts.py"),
                              "bench", str(folder), str(Path(tmp) / "inputs.npz"),
                              str(args.repeats), str(args.threads)], env=env,
                             capture_output=True, text=True, timeout=3600)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        ref = json.loads(out.stdout.strip().splitlines()[-1])
        wall, cpu, audio = cake(speech, x, args.repeats)
    theirs = np.array(ref["audio"], dtype=np.float32)
    assert audio.shape == theirs.shape, (audio.shape, theirs.shape)
    scale = float(np.abs(theirs).max())
    drift = float(np.abs(audio - theirs).max()) / scale
    assert drift <= 1e-4, drift
    audio_s = len(theirs) / 48000
    ms = {name: 1000 * statistics.median(v) / audio_s for name, v in
          (("reference_wall", ref["wall"]), ("reference_cpu", ref["cpu"]),
           ("cake_wall", wall), ("cake_cpu", cpu))}
    print(json.dumps({"real_size": args.real_size, "audio_s": round(audio_s, 3),
                      "steps": args.steps, "threads": args.threads,
                      **{f"{k}_ms_per_audio_s": round(v, 1) for k, v in ms.items()},
                      "speedup_wall": round(ms["reference_wall"] / ms["cake_wall"], 2),
                      "speedup_cpu": round(ms["reference_cpu"] / ms["cake_cpu"], 2),
                      "max_drift": drift, "loadavg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
