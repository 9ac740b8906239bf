"""The speech service the server holds: a loaded speech model, the voices requests may use,
and a SerialWorker (cake/jobs.py) that runs syntheses one at a time in arrival order, so the
event loop keeps answering while audio is made. A job's events are float32 audio chunks,
then a Done.

A model (PiperSpeech, VibeVoiceSpeech) has model_id, sample_rate, can_clone,
voice_names(), check(req) (raises ValueError for a request it cannot serve),
synthesize(req, cancelled) -> iterator of float32 chunks (cancelled() says stop), and close().
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cake.audio.audio_io import AudioError, read_audio
from cake.audio.voices import VoiceLibrary, VoiceNotAllowed
from cake.jobs import Job, SerialWorker

log = logging.getLogger(__name__)

# OpenAI's built-in voice names: its clients always send one, so they select the default voice.
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                 "shimmer", "verse", "marin", "cedar"}
MAX_VOICE_SECONDS = 300
# Allowed ranges of the numeric request parameters (inclusive).
RANGES = {"cfg_scale": (1.0, 3.0), "max_frames": (1, 40500), "diffusion_steps": (1, 100),
          "speed": (0.25, 4.0)}


@dataclass
class VoiceSample:
    samples: np.ndarray  # mono float32
    rate: int
    source: str  # where it came from, for messages
    text: Optional[str] = None  # the words spoken in it (LuxTTS needs them)


@dataclass
class SpeechRequest:
    text: str
    voice: Optional[str] = None  # a voice of the model itself (Piper voice or speaker name)
    sample: Optional[VoiceSample] = None  # a voice to clone
    cfg_scale: float = 1.5
    max_frames: int = 150
    diffusion_steps: int = 10
    speed: float = 1.0
    seed: Optional[int] = None


_job_ids = itertools.count(1)


@dataclass
class SpeechJob(Job):
    req: SpeechRequest
    id: int = field(default_factory=lambda: next(_job_ids))


def load_sample(data: bytes, source: str, path: Optional[Path] = None) -> VoiceSample:
    """A voice sample; a server-side one may carry its transcript in a .txt file beside it."""
    try:
        samples, rate = read_audio(data)
    except AudioError as e:
        raise ValueError(f"{source}: {e}") from None
    if len(samples) > MAX_VOICE_SECONDS * rate:
        raise ValueError(f"{source} is longer than {MAX_VOICE_SECONDS} s")
    text = None
    if path is not None and (transcript := Path(path).with_suffix(".txt")).is_file():
        text = transcript.read_text(encoding="utf-8", errors="replace").strip() or None
    return VoiceSample(samples, rate, source, text)


class SpeechService:
    def __init__(self, model, voices: VoiceLibrary):
        self.model, self.voices = model, voices
        self.model_id, self.sample_rate = model.model_id, model.sample_rate
        self.default_sample = None
        if voices.prompt is not None and model.can_clone:
            self.default_sample = load_sample(voices.prompt.read_bytes(), "--voice-prompt",
                                              voices.prompt)
        self.worker = SerialWorker(self._synthesize, "speech")

    def voice_names(self) -> list[str]:
        names = list(self.model.voice_names())
        if self.model.can_clone:
            names += [n for n in self.voices.names() if n not in names]
        return names

    def request(self, text: str, voice: Optional[str] = None, voice_data: Optional[bytes] = None,
                voice_path: Optional[str] = None, voice_text: Optional[str] = None,
                **params) -> SpeechRequest:
        """A validated request; ValueError carries the message for the client. Parameters
        left as None take the model's own defaults (LuxTTS: 4 steps, guidance 3)."""
        if not text or not text.strip():
            raise ValueError("input must be non-empty text")
        params = {**getattr(self.model, "defaults", {}),
                  **{k: v for k, v in params.items() if v is not None or k == "seed"}}
        for name, value in params.items():
            low, high = RANGES.get(name, (None, None))
            if low is not None and not low <= value <= high:
                raise ValueError(f"{name} must be between {low} and {high}, got {value}")
        if voice_data is not None and voice_path is not None:
            raise ValueError("give either voice_data or voice_path, not both")
        wants_clone = voice_data is not None or voice_path is not None
        if wants_clone and not self.model.can_clone:
            raise ValueError(f"{self.model_id} cannot clone a voice: voice_data and voice_path "
                             "need a model that clones a sample (VibeVoice-1.5B, LuxTTS); use voice "
                             f"to pick one of {', '.join(self.voice_names())}")
        req = SpeechRequest(text=text, **params)
        if voice_data is not None:
            req.sample = load_sample(voice_data, "voice_data")
        elif voice_path is not None:
            try:
                path = self.voices.check_path(voice_path)
            except VoiceNotAllowed as e:
                raise ValueError(str(e)) from None
            req.sample = load_sample(path.read_bytes(), f"voice_path {voice_path!r}", path)
        elif voice is not None:
            self._pick_voice(req, voice)
        if req.sample is None and req.voice is None:
            req.sample = self.default_sample
        if voice_text is not None:
            if req.sample is None:
                raise ValueError("voice_text is the transcript of a voice sample: send it with "
                                 "voice_data, voice_path or a voice sample's name")
            req.sample = VoiceSample(req.sample.samples, req.sample.rate, req.sample.source,
                                     voice_text)
        self.model.check(req)
        return req

    def _pick_voice(self, req: SpeechRequest, voice: str) -> None:
        library = self.voices.names() if self.model.can_clone else {}
        if voice in self.model.voice_names():
            req.voice = voice
        elif voice in library:
            req.sample = load_sample(Path(library[voice]).read_bytes(), f"voice {voice!r}",
                                     Path(library[voice]))
        elif voice.lower() in OPENAI_VOICES:
            pass  # the default voice
        else:
            names = self.voice_names()
            raise ValueError(f"unknown voice {voice!r}; this server has "
                             f"{', '.join(names) if names else 'only its default voice'}")

    def submit(self, req: SpeechRequest, on_event: Callable) -> SpeechJob:
        return self.worker.submit(SpeechJob(req), on_event)

    def stats(self) -> dict:
        return self.worker.stats()

    def topology(self) -> Optional[dict]:
        """/api/v1/topology: where the model's layers run; None for a model with no layers
        to place (a Piper voice)."""
        return self.model.topology() if hasattr(self.model, "topology") else None

    def _synthesize(self, job: SpeechJob) -> None:
        for chunk in self.model.synthesize(job.req, lambda: job.cancelled):
            job.emit(chunk)

    def close(self) -> None:
        self.worker.close()
        self.model.close()
