"""Speech models on the command line: flags, loading, and `cake run` writing a WAV file."""
from __future__ import annotations

import argparse


def add_once(group, *flags, **kwargs) -> None:
    """Add a flag unless another model type already defines it (they share one parser)."""
    taken = group._option_string_actions  # the parser's table, shared by its groups
    if not any(f in taken for f in flags):
        group.add_argument(*flags, **kwargs)


def add_args(p) -> None:
    g = p.add_argument_group("speech models (--model-type audio-model)")
    add_once(g, "--voice-prompt", metavar="WAV",
             help="voice sample to clone by default (VibeVoice); requests may also name it "
                  "in voice_path")
    add_once(g, "--voice-dir", action="append", metavar="DIR",
             help="directory of voice samples requests may use by voice name or voice_path "
                  "(repeatable); no other server-side file is ever read")
    add_once(g, "--audio-output", default="speech.wav", metavar="FILE",
             help="cake run: where to write the WAV (default speech.wav)")
    add_once(g, "--voice", help="cake run: voice name (a Piper voice or a voice-dir sample)")
    add_once(g, "--cfg-scale", type=float, default=None,
             help="guidance, 1.0-3.0 (default: VibeVoice 1.5, LuxTTS 3.0)")
    add_once(g, "--diffusion-steps", type=int, default=None,
             help="VibeVoice steps per frame (default 10), LuxTTS Euler steps (default 4)")
    add_once(g, "--voice-text", metavar="TEXT",
             help="cake run: the words spoken in --voice-prompt (LuxTTS; default: the .txt "
                  "file beside it)")
    add_once(g, "--max-frames", type=int, default=150,
             help="cake run: VibeVoice speech frames at most (7.5 per second)")
    add_once(g, "--speed", type=float, default=1.0, help="cake run: speaking rate (Piper)")


def load(args: argparse.Namespace):
    """The bundled Piper voice when no model is named, a Piper .onnx voice file, or a
    VibeVoice or VibeVoice-Realtime checkpoint (folder or Hugging Face repo id; Microsoft's
    original layout is converted on load). A checkpoint cake recognises but cannot serve
    or a LuxTTS folder. A checkpoint that does not load ends the command with one line."""
    from pathlib import Path

    from cake.audio.service import SpeechService
    from cake.audio.voices import VoiceLibrary

    voices = VoiceLibrary(args.voice_prompt, args.voice_dir)
    piper = not args.model or args.model.endswith(".onnx")
    cluster = getattr(args, "cluster", None)
    if piper and cluster is not None:
        raise SystemExit("cake: --cluster-key spreads a VibeVoice model's language model over "
                         "workers; a Piper voice is small and runs on one machine (drop the key)")
    if piper and (args.voice_prompt or args.voice_dir):
        raise SystemExit("cake: --voice-prompt and --voice-dir are voice samples to clone, "
                         "which needs a VibeVoice model; a Piper voice cannot clone")
    if not args.model:
        from cake.audio.piper_voice import PiperSpeech

        model = PiperSpeech.bundled()
    elif args.model.endswith(".onnx") and Path(args.model).is_file():
        from cake.audio.piper_voice import PiperSpeech

        model = PiperSpeech(Path(args.model))
    else:
        from cake import hub
        from cake.audio.luxtts.checkpoint import CheckpointError, is_luxtts
        from cake.audio.vibevoice.checkpoint import UnsupportedCheckpoint
        from cake.audio.vibevoice.model import VibeVoiceSpeech
        from cake.audio.vibevoice.realtime import VibeVoiceRealtimeSpeech, is_realtime

        ref = hub.resolve(args.model)
        try:
            if is_luxtts(Path(ref.path)):
                if cluster is not None:
                    raise SystemExit("cake: LuxTTS runs on one machine (a 123M-parameter "
                                     "model has no layers worth splitting; drop the key)")
                from cake.audio.luxtts.speech import LuxTTSSpeech

                model = LuxTTSSpeech.load(ref.path, ref.model_id, device=args.device)
            elif is_realtime(Path(ref.path)):
                if cluster is not None:
                    raise SystemExit("cake: VibeVoice-Realtime runs on one machine; its "
                                     "voices are prefilled caches a cluster cannot take yet "
                                     "(drop the cluster key)")
                if args.voice_prompt:
                    raise SystemExit("cake: VibeVoice-Realtime speaks in voice presets (.pt "
                                     "files in its voices/ folder or a --voice-dir), it cannot "
                                     "clone --voice-prompt")
                model = VibeVoiceRealtimeSpeech.load(ref.path, ref.model_id, device=args.device,
                                                     dtype=args.dtype, voice_dirs=args.voice_dir)
            else:
                model = VibeVoiceSpeech.load(ref.path, ref.model_id, device=args.device,
                                             dtype=args.dtype, cluster=cluster)
        except (UnsupportedCheckpoint, CheckpointError, FileNotFoundError) as e:
            raise SystemExit(f"cake: {e}") from None
    return SpeechService(model, voices)


def run(service, args) -> None:
    """Synthesize args.prompt once and write it as a 16-bit WAV file."""
    import numpy as np

    from cake.audio.audio_io import wav_bytes

    try:
        req = service.request(args.prompt, voice=args.voice, cfg_scale=args.cfg_scale,
                              voice_text=getattr(args, "voice_text", None),
                              max_frames=args.max_frames, diffusion_steps=args.diffusion_steps,
                              speed=args.speed, seed=getattr(args, "seed", None))
    except ValueError as e:
        raise SystemExit(f"cake: {e}")
    chunks = list(service.model.synthesize(req, lambda: False))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    with open(args.audio_output, "wb") as f:
        f.write(wav_bytes(samples, service.sample_rate))
    print(f"cake: wrote {len(samples) / service.sample_rate:.2f} s of speech "
          f"({service.sample_rate} Hz) to {args.audio_output}")
