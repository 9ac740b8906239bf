"""VibeVoice-Realtime: milliseconds per second of audio, cake's implementation against
Microsoft's reference on the same tiny random checkpoint, voice preset, text and settings
(guided, cfg 1.5), on this machine in the same run.

    python benchmarks/bench_speech_realtime.py --reference-src /path/to/VibeVoice \
        --reference-python /work/refenv-vibevoice/bin/python --tokens 120 --repeats 3

The reference runs in its own environment (tests/reference/vibevoice_realtime.py says how to
make it), in a child process; cake runs here. Each side reports the median of --repeats timed
runs after a warm-up; cake makes exactly as many frames as the reference did, and the script
checks that both made the same audio (the first 21 frames to 1e-4 of the peak; max_drift is
the largest difference over all frames, relative to the peak). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from speech_models import write_realtime  # noqa: E402

from cake.audio.vibevoice.realtime import SAMPLE_RATE, VibeVoiceRealtimeSpeech  # noqa: E402

TEXT = ("Hello world, this is a test of speech. It goes on for a while, so that the windows "
        "of text and speech take turns many times before the end.")


def reference(args, folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": args.reference_src}
    script = ROOT / "tests/reference/vibevoice_realtime.py"
    out = subprocess.run([args.reference_python, str(script), "bench", str(folder), TEXT,
                          str(args.tokens), str(args.repeats)],
                         env=env, capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cake(folder: Path, frames: int, repeats: int) -> tuple[list[float], np.ndarray]:
    speech = VibeVoiceRealtimeSpeech.load(folder, "bench")
    preset, ids = speech.preset("voice"), speech.text_ids(TEXT)
    seconds = []
    for _ in range(repeats + 1):
        torch.manual_seed(7)
        started = time.perf_counter()
        audio = torch.cat(list(speech.frames(preset, ids, 1.5, 5, frames))).numpy()
        seconds.append(time.perf_counter() - started)
    return seconds[1:], audio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-python", default="/work/refenv-vibevoice/bin/python")
    p.add_argument("--reference-src", required=True, help="a checkout of microsoft/VibeVoice")
    p.add_argument("--tokens", type=int, default=120, help="reference max_new_tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--real-size", action="store_true",
                   help="VibeVoice-Realtime-0.5B's shape (random weights, its own voice preset)")
    args = p.parse_args()
    hop = 3200 if args.real_size else 160
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "realtime-tiny"
        write_realtime(folder, real_size=args.real_size)
        (folder / "voices").mkdir()
        ref = reference(args, folder)
        shutil.copy(folder / "bench-voice.pt", folder / "voices/voice.pt")
        frames = ref["samples"] // hop
        ours, audio = cake(folder, frames, args.repeats)
    theirs = np.array(ref["audio"], dtype=np.float32)
    assert audio.shape == theirs.shape, (audio.shape, theirs.shape)
    # Float rounding grows with the frames in a random model (the reference drifts as far from
    # itself with eager instead of sdpa attention): check the first 21 frames as the tests do.
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(audio[:21 * hop], theirs[:21 * hop], rtol=0, atol=1e-4 * scale)
    drift = float(np.abs(audio - theirs).max() / scale)
    audio_s = ref["samples"] / SAMPLE_RATE
    ref_ms = 1000 * statistics.median(ref["seconds"]) / audio_s
    cake_ms = 1000 * statistics.median(ours) / audio_s
    print(json.dumps({"frames": frames, "audio_s": round(audio_s, 3),
                      "reference_ms_per_audio_s": round(ref_ms, 1),
                      "cake_ms_per_audio_s": round(cake_ms, 1),
                      "speedup": round(ref_ms / cake_ms, 2), "max_drift": round(drift, 5),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
