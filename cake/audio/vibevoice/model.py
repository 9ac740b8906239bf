"""A loaded VibeVoice model as a speech model of the speech service: prompt building (the
layout of transformers' VibeVoice chat template), voice-sample encoding for cloning, and
synthesis through the frame loop."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from cake.audio.audio_io import resample
from cake.audio.service import SpeechRequest
from cake.audio.vibevoice import checkpoint
from cake.audio.vibevoice.generate import FrameGenerator, SpeechTokens
from cake.audio.vibevoice.lm import SpeechLM

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
SYSTEM_PROMPT = (" Transform the text provided by various speakers into speech output, "
                 "utilizing the distinct voice of each respective speaker.\n")
# The speech tokens are Qwen2.5's vision tokens, reused.
TOKEN_NAMES = {"audio_bos": "<|vision_start|>", "audio_eos": "<|vision_end|>",
               "audio": "<|vision_pad|>", "eos": "<|endoftext|>"}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def speech_tokens(tokenizer, config) -> SpeechTokens:
    """Token ids from the tokenizer's special tokens (as transformers' processor finds
    them), falling back to the model config's."""
    fallback = {"audio_bos": config.audio_bos_token_id, "audio_eos": config.audio_eos_token_id,
                "audio": config.audio_token_id, "eos": config.eos_token_id}
    found = {}
    for field, token in TOKEN_NAMES.items():
        tid = tokenizer.token_to_id(token)
        found[field] = fallback[field] if tid is None else tid
    return SpeechTokens(**found)


class VibeVoiceSpeech:
    can_clone = True
    sample_rate = SAMPLE_RATE

    def __init__(self, model, tokenizer, scheduler_args: dict, model_id: str,
                 layer_ranges: Optional[list[tuple[int, int]]] = None, ring=None):
        from transformers import VibeVoiceAcousticTokenizerFeatureExtractor

        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.tokens = speech_tokens(tokenizer, model.config)
        text_config = model.config.text_config
        self.context = text_config.max_position_embeddings
        self.lm = SpeechLM(model.model.language_model, model.lm_head, text_config.to_dict(),
                           self.tokens.ids(), layer_ranges, ring)
        self.generator = FrameGenerator(model, self.lm, self.tokens, scheduler_args)
        self.hop = model.config.audio_config.hop_length
        self.features = VibeVoiceAcousticTokenizerFeatureExtractor(
            sampling_rate=SAMPLE_RATE, pad_to_multiple_of=self.hop)

    @classmethod
    def load(cls, folder: Path, model_id: str, device: Optional[str] = None,
             dtype: Optional[str] = None, cluster=None) -> "VibeVoiceSpeech":
        """cluster: ClusterOptions to run the language model's layers on cluster nodes."""
        from tokenizers import Tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = DTYPES[dtype] if dtype else (torch.float32 if device == "cpu"
                                                   else torch.bfloat16)
        started = time.monotonic()
        model, scheduler_args, converted = checkpoint.load_model(Path(folder), torch_dtype, device)
        tokenizer = Tokenizer.from_file(str(checkpoint.find_tokenizer(Path(folder))))
        log.info("loaded %s (%s layout) on %s in %.1f s", model_id,
                 "original, converted" if converted else "transformers", device,
                 time.monotonic() - started)
        ring = None
        if cluster is not None:
            from cake.audio.vibevoice.cluster import start_language_model_ring

            text_config = model.config.text_config
            ring = start_language_model_ring(Path(folder), text_config.to_dict(), torch_dtype,
                                             device, text_config.max_position_embeddings, cluster)
            # The stages hold the layers now (the master's from the files): free these.
            model.model.language_model.layers = torch.nn.ModuleList()
        return cls(model, tokenizer, scheduler_args, model_id, ring=ring)

    def voice_names(self) -> list[str]:
        return []  # voices are samples from the voice library, cloned

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, text: str, voice_frames: int) -> list[int]:
        """System prompt, the voice sample's placeholder frames when cloning, the text as
        speaker 0's line, then the speech-start token."""
        t = self.tokens
        text = " ".join(text.split())  # a newline would read as a new speaker line
        ids = []
        if voice_frames:
            ids += self.encode(SYSTEM_PROMPT + " Voice input:\n Speaker 0:")
            ids += [t.audio_bos] + [t.audio] * voice_frames + [t.audio_eos]
            ids += self.encode("\n Text input:\n Speaker 0: " + text + "\n Speech output:\n")
        else:
            ids += self.encode(SYSTEM_PROMPT + " Text input:\n Speaker 0: " + text
                               + "\n Speech output:\n")
        return ids + [t.audio_bos]

    def voice_frames(self, num_samples: int, rate: int) -> int:
        return -(-round(num_samples * SAMPLE_RATE / rate) // self.hop)

    def check(self, req: SpeechRequest) -> None:
        if req.speed != 1.0:
            raise ValueError("speed is not supported by VibeVoice: leave it at 1.0")
        frames = self.voice_frames(len(req.sample.samples), req.sample.rate) if req.sample else 0
        needed = len(self.prompt_ids(req.text, frames)) + req.max_frames
        if needed > self.context:
            raise ValueError(f"the prompt and max_frames need {needed} positions; this model's "
                             f"context holds {self.context}")

    def voice_features(self, samples: np.ndarray, rate: int):
        """A voice sample -> its acoustic-latent embeddings [frames, D] for the prompt."""
        audio = resample(samples, rate, SAMPLE_RATE)
        inputs = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        device, dtype = self.lm.device, self.lm.dtype
        out = self.model.model.get_audio_features(
            inputs["input_values"].to(device, dtype), inputs["padding_mask"].to(device))
        return out.pooler_output

    @torch.inference_mode()
    def prompt_embeds(self, text: str, sample=None):
        """The input embeddings [1, L, D] of a prompt, and its token ids."""
        voice = self.voice_features(sample.samples, sample.rate) if sample is not None else None
        ids = self.prompt_ids(text, 0 if voice is None else voice.shape[0])
        ids_t = torch.tensor([ids], device=self.lm.device)
        embeds = self.lm.embed(ids_t)
        if voice is not None:
            embeds[ids_t == self.tokens.audio] = voice.to(embeds.dtype)
        return embeds, ids

    def synthesize(self, req: SpeechRequest, cancelled: Callable[[], bool]
                   ) -> Iterator[np.ndarray]:
        if req.seed is not None:
            torch.manual_seed(req.seed)
        embeds, _ = self.prompt_embeds(req.text, req.sample)
        for audio in self.generator.frames(embeds, req.cfg_scale, req.diffusion_steps,
                                           req.max_frames, cancelled):
            yield audio.float().cpu().numpy()

    def topology(self) -> dict:
        from cake.cluster.topology import text_topology

        if self.lm.ring is not None:
            return self.lm.ring.topology(self.model_id)
        return text_topology(self.model_id, self.lm.stages)

    def close(self) -> None:
        if self.lm.ring is not None:
            self.lm.ring.close()
