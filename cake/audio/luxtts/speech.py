"""LuxTTS behind the speech service: a reference clip and its transcript in, speech out at the
API's 24 kHz (its vocoder makes 48 kHz; the API serves every voice at 24 kHz).

The whole utterance is made at once (flow matching is not autoregressive): cancellation is
checked before every Euler step, and the audio goes out in 0.2 s chunks. Cake runs no speech
recogniser, so the clip's words come with the request (voice_text) or from a .txt file beside
a server-side voice sample."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from cake.audio.audio_io import API_RATE, resample
from cake.audio.luxtts import checkpoint
from cake.audio.luxtts.features import HOP, RATE, log_mel
from cake.audio.luxtts.text import Phonemizer

log = logging.getLogger(__name__)

FEAT_SCALE = 0.1  # features are trained scaled by this
PROMPT_SECONDS = 5.0  # the reference keeps the clip's first 5 s
PROMPT_RMS = 0.01  # quieter clips are raised to this loudness
OUTPUT_RMS = 0.1  # ... and the speech lowered again by prompt_rms / OUTPUT_RMS
SPEED_FACTOR = 1.3  # LuxTTS speaks 1.3x the duration rule's rate at speed 1
T_SHIFT = 0.5
MAX_SECONDS = 60
CHUNK = 4800  # 0.2 s at 24 kHz


class LuxTTSSpeech:
    can_clone = True
    sample_rate = API_RATE
    needs_voice_text = True
    defaults = {"cfg_scale": 3.0, "diffusion_steps": 4}

    def __init__(self, flow, vocoder, tokens: dict[str, int], model_id: str):
        self.flow, self.vocoder, self.model_id = flow, vocoder, model_id
        self.phonemizer = Phonemizer(tokens)

    @classmethod
    def load(cls, folder: Path, model_id: str, device: Optional[str] = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        started = time.monotonic()
        flow, vocoder, tokens, _ = checkpoint.load(Path(folder), device)
        log.info("loaded %s (LuxTTS) on %s in %.1f s", model_id, device,
                 time.monotonic() - started)
        return cls(flow, vocoder, tokens, model_id)

    def voice_names(self) -> list[str]:
        return []

    def _ids(self, text: str, what: str) -> list[int]:
        ids = self.phonemizer.ids(text)
        if not ids:
            raise ValueError(f"{what} gives no phonemes this model knows")
        return ids

    def check(self, req) -> None:
        if req.sample is None:
            raise ValueError(f"{self.model_id} clones a voice: send voice_data or voice_path "
                             "with voice_text (or start the server with --voice-prompt)")
        if not (req.sample.text or "").strip():
            raise ValueError(f"{self.model_id} needs the words spoken in the voice sample: "
                             "send them as voice_text, or put them in a .txt file beside a "
                             "server-side sample (cake runs no speech recogniser)")
        self._ids(req.text, "input")
        self._ids(req.sample.text, "voice_text")

    def prompt(self, samples: np.ndarray, rate: int) -> tuple[torch.Tensor, float]:
        """The clip's scaled features (1, frames, feat) and its original loudness."""
        wave = resample(samples.astype(np.float32), rate, RATE)[:int(PROMPT_SECONDS * RATE)]
        wave = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        rms = float(torch.sqrt(torch.mean(wave ** 2)))
        if 0 < rms < PROMPT_RMS:
            wave = wave * PROMPT_RMS / rms
        device = self.flow.embed.weight.device
        return (log_mel(wave.to(device)) * FEAT_SCALE)[None], rms

    def synthesize(self, req, cancelled: Callable[[], bool]) -> Iterator[np.ndarray]:
        features, rms = self.prompt(req.sample.samples, req.sample.rate)
        generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        wave = self.generate(self._ids(req.text, "input"), self._ids(req.sample.text, "voice_text"),
                             features, rms, req.diffusion_steps, req.cfg_scale, req.speed,
                             generator=generator, cancelled=cancelled)
        if wave is None:
            return
        wave = resample(wave, self.vocoder.rate, API_RATE)
        for start in range(0, len(wave), CHUNK):
            if cancelled():
                return
            yield wave[start:start + CHUNK]

    @torch.inference_mode()
    def generate(self, tokens: list[int], prompt_tokens: list[int], prompt_features, prompt_rms,
                 steps: int, guidance: float, speed: float, noise: Optional[torch.Tensor] = None,
                 generator=None, cancelled=None) -> Optional[np.ndarray]:
        flow, device = self.flow, self.flow.embed.weight.device
        n_prompt = prompt_features.shape[1]
        frames = flow.frame_count(len(tokens), len(prompt_tokens), n_prompt,
                                  speed * SPEED_FACTOR)
        if frames - n_prompt > MAX_SECONDS * RATE // HOP:
            raise ValueError(f"the text would make over {MAX_SECONDS} s of speech")
        text = flow.text_condition(prompt_tokens + tokens, frames)
        speech = torch.nn.functional.pad(prompt_features, (0, 0, 0, frames - n_prompt))
        if noise is None:
            noise = torch.randn(1, frames, flow.feat_dim, generator=generator).to(device)
        mel = flow.sample(noise, text, speech, steps, guidance, T_SHIFT, cancelled)
        if mel is None:
            return None
        mel = mel[:, n_prompt:frames].transpose(1, 2) / FEAT_SCALE
        wave = self.vocoder(mel.float())[0].clamp(-1, 1)
        if prompt_rms < OUTPUT_RMS:
            wave = wave * (prompt_rms / OUTPUT_RMS)
        return wave.cpu().numpy().astype(np.float32)

    def close(self) -> None:
        pass
