"""VibeVoice-Realtime (microsoft/VibeVoice-Realtime-0.5B, config model_type
"vibevoice_streaming"): streaming text to speech, following Microsoft's reference
(vibevoice/modular/modeling_vibevoice_streaming_inference.py).

Its Qwen2 decoder is cut in two: the lower layers are a text LM (no final norm), the upper
ones a TTS LM. They are fed in turns, a window of 5 text tokens then 6 speech frames:
  text window: the text LM encodes the tokens; its hidden states plus the "text" type
    embedding are the TTS LM's inputs at those positions.
  speech frame: the diffusion head turns the TTS LM's last hidden state (guided by a negative
    branch) into an acoustic latent; the acoustic decoder makes its audio; the latent through
    the connector plus the "speech" type embedding is both branches' next TTS LM input; an
    end-of-speech classifier on the TTS LM's new state says when to stop.
A voice is a preset (presets.py): the caches of a voice prompt already run, loaded into the
two LMs' caches before the text. There is no acoustic encoder and no semantic tokenizer.

Shared with VibeVoice-1.5B: the checkpoint's names convert alike (checkpoint.convert_name) to
transformers' acoustic decoder, diffusion head and connector modules; both LMs run as cake's
SpeechLM stages; the head's sampling is LatentSampler.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from itertools import count
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from cake.audio.service import SpeechRequest
from cake.audio.vibevoice import checkpoint
from cake.audio.vibevoice.generate import LatentSampler
from cake.audio.vibevoice.lm import PROMPTED, UNCONDITIONAL, SpeechLM
from cake.audio.vibevoice.presets import PresetError, VoicePreset, load_preset

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
TEXT_WINDOW, SPEECH_WINDOW = 5, 6
TEXT_TYPE, SPEECH_TYPE = 1, 0  # rows of tts_input_types


def is_realtime(folder: Path) -> bool:
    config = Path(folder) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "vibevoice_streaming"
    except (OSError, ValueError, AttributeError):
        return False


class EosClassifier(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The probability that the speech has ended, per row."""
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))[..., 0]


class RealtimeModel(nn.Module):
    """The checkpoint's modules under their converted names."""

    def __init__(self, cfg: dict):
        from transformers import (Qwen2Config, Qwen2Model, VibeVoiceAcousticTokenizerConfig,
                                  VibeVoiceAcousticTokenizerDecoderModel)
        from transformers.models.vibevoice.configuration_vibevoice import (
            VibeVoiceDiffusionHeadConfig)
        from transformers.models.vibevoice.modeling_vibevoice import (
            VibeVoiceDiffusionHead, VibeVoiceMultiModalProjector)

        super().__init__()
        text = {k: v for k, v in cfg["decoder_config"].items() if k != "torch_dtype"}
        tts_layers = cfg.get("tts_backbone_num_hidden_layers", 20)
        hidden = text["hidden_size"]
        self.text_config = {**text, "num_hidden_layers": text["num_hidden_layers"] - tts_layers}
        self.tts_config = {**text, "num_hidden_layers": tts_layers}
        tower = VibeVoiceAcousticTokenizerConfig(
            **checkpoint.tokenizer_config(cfg["acoustic_tokenizer_config"], with_decoder=True))
        self.hop, self.latent_size = tower.hop_length, tower.hidden_size
        m = self.model = nn.Module()
        with torch.device("meta"):  # filled by loading; cake's stages run their layers
            m.language_model = Qwen2Model(Qwen2Config(**self.text_config))
            m.tts_language_model = Qwen2Model(Qwen2Config(**self.tts_config))
        for lm in (m.language_model, m.tts_language_model):
            lm.rotary_emb = None  # cake's stages keep their own rope tables
        m.language_model.norm = nn.Identity()  # the text LM hands on un-normed states
        m.audio_tower = nn.Module()
        m.audio_tower.decoder = VibeVoiceAcousticTokenizerDecoderModel(tower.decoder_config)
        m.multi_modal_projector = VibeVoiceMultiModalProjector(tower.hidden_size, hidden)
        m.diffusion_head = VibeVoiceDiffusionHead(VibeVoiceDiffusionHeadConfig(
            hidden_size=hidden, latent_size=tower.hidden_size,
            **checkpoint.head_config(cfg, hidden)))
        m.tts_input_types = nn.Embedding(2, hidden)
        m.latent_scaling_factor = nn.Parameter(torch.tensor(1.0))
        m.latent_bias_factor = nn.Parameter(torch.tensor(0.0))
        self.tts_eos_classifier = EosClassifier(hidden)


def load_model(folder: Path, dtype: torch.dtype, device: str) -> tuple[RealtimeModel, dict]:
    """The checkpoint as a RealtimeModel in eval mode, and the diffusers scheduler arguments."""
    cfg = json.loads((folder / "config.json").read_text())
    lacking = [k for k in ("decoder_config", "acoustic_tokenizer_config") if k not in cfg]
    if lacking:
        raise checkpoint.UnsupportedCheckpoint(
            f"{folder}: its config.json lacks {' and '.join(lacking)}, which a VibeVoice-Realtime "
            "checkpoint has")
    model = RealtimeModel(cfg)
    state = {}
    for name, tensor in checkpoint.read_safetensors(folder).items():
        name = checkpoint.convert_name(name)
        if not name.startswith("model.audio_tower.encoder."):  # voices come as presets
            state[name] = tensor
    # The TTS LM's inputs are always embeddings, so its embedding table is never read.
    unread = "model.tts_language_model.embed_tokens.weight"
    if unread not in state and "model.language_model.embed_tokens.weight" in state:
        state[unread] = state["model.language_model.embed_tokens.weight"]
    checkpoint.check_loaded(model, state)
    model.load_state_dict(state, assign=True)
    return model.to(device, dtype).eval(), checkpoint.scheduler_config(cfg)


def find_voices(folder: Path, voice_dirs: list[str]) -> dict[str, Path]:
    """Preset name (file stem) -> file: the checkpoint's voices/ folder, then --voice-dir."""
    found = {}
    for d in [Path(folder) / "voices", *map(Path, voice_dirs)]:
        if d.is_dir():
            for f in sorted(d.glob("*.pt")):
                if f.is_file() and f.resolve().is_relative_to(d.resolve()):
                    found.setdefault(f.stem, f)
    return found


class VibeVoiceRealtimeSpeech:
    can_clone = False
    sample_rate = SAMPLE_RATE

    def __init__(self, model: RealtimeModel, tokenizer, scheduler_args: dict, model_id: str,
                 voices: dict[str, Path]):
        m = model.model
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.text_lm = SpeechLM(m.language_model, None, model.text_config, [])
        self.tts_lm = SpeechLM(m.tts_language_model, None, model.tts_config, [])
        self.sampler = LatentSampler(m.diffusion_head, model.latent_size, scheduler_args)
        self.context = model.text_config.get("max_position_embeddings", 8192)
        self.voices, self._presets = voices, {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, model_id: str, device: Optional[str] = None,
             dtype: Optional[str] = None, voice_dirs: Optional[list[str]] = None):
        from tokenizers import Tokenizer

        from cake.audio.vibevoice.model import DTYPES

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = DTYPES[dtype] if dtype else (torch.float32 if device == "cpu"
                                                   else torch.bfloat16)
        started = time.monotonic()
        model, scheduler_args = load_model(Path(folder), torch_dtype, device)
        tokenizer = Tokenizer.from_file(str(checkpoint.find_tokenizer(Path(folder))))
        voices = find_voices(Path(folder), voice_dirs or [])
        log.info("loaded %s (VibeVoice-Realtime, %d voices) on %s in %.1f s", model_id,
                 len(voices), device, time.monotonic() - started)
        return cls(model, tokenizer, scheduler_args, model_id, voices)

    def voice_names(self) -> list[str]:
        return list(self.voices)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text.strip() + "\n", add_special_tokens=False).ids

    def preset(self, name: Optional[str]) -> VoicePreset:
        if not self.voices:
            raise ValueError(f"{self.model_id} has no voice presets: put .pt presets in its "
                             "voices/ folder or in a --voice-dir")
        name = name or next(iter(self.voices))
        with self._lock:
            if name not in self._presets:
                self._presets[name] = self._checked(load_preset(self.voices[name]), name)
            return self._presets[name]

    def _checked(self, preset: VoicePreset, name: str) -> VoicePreset:
        for part, prompt, lm in (("lm", preset.lm, self.text_lm),
                                 ("tts_lm", preset.tts, self.tts_lm),
                                 ("neg_tts_lm", preset.neg_tts, self.tts_lm)):
            a, k = lm.args, prompt.layers[0][0]
            want = (a.num_hidden_layers, a.num_key_value_heads, a.head_dim, a.hidden_size)
            got = (len(prompt.layers), k.shape[0], k.shape[2], prompt.last_hidden.shape[0])
            if got != want:
                raise PresetError(f"voice preset {name!r} was made for another model: its {part} "
                                  f"has (layers, kv heads, head dim, hidden) {got}, this model "
                                  f"{want}")
        return preset

    def check(self, req: SpeechRequest) -> None:
        if req.speed != 1.0:
            raise ValueError("speed is not supported by VibeVoice: leave it at 1.0")
        preset = self.preset(req.voice)
        needed = preset.tts.length + len(self.text_ids(req.text)) + req.max_frames
        if needed > self.context:
            raise ValueError(f"the voice, the text and max_frames need {needed} positions; "
                             f"this model's context holds {self.context}")

    def synthesize(self, req: SpeechRequest, cancelled: Callable[[], bool]
                   ) -> Iterator[np.ndarray]:
        if req.seed is not None:
            torch.manual_seed(req.seed)
        for audio in self.frames(self.preset(req.voice), self.text_ids(req.text), req.cfg_scale,
                                 req.diffusion_steps, req.max_frames, cancelled):
            yield audio.float().cpu().numpy()

    @torch.inference_mode()
    def frames(self, preset: VoicePreset, text: list[int], cfg_scale: float, steps: int,
               max_frames: int, cancelled: Optional[Callable[[], bool]] = None
               ) -> Iterator[torch.Tensor]:
        """The audio of each frame ([hop] samples at 24 kHz) until the end-of-speech
        classifier says so, max_frames, or `cancelled` is set."""
        m, lm, tts = self.model.model, self.text_lm, self.tts_lm
        device, dtype = m.tts_input_types.weight.device, m.tts_input_types.weight.dtype
        guided = cfg_scale != 1.0
        lm_cache = lm.new_cache(preset.lm.length + len(text))
        tts_cache = tts.new_cache(max(preset.tts.length + len(text), preset.neg_tts.length)
                                  + max_frames + 1)
        lm.load_prefix(lm_cache, PROMPTED, preset.lm.layers)
        tts.load_prefix(tts_cache, PROMPTED, preset.tts.layers)
        h_pos, h_neg = preset.tts.last_hidden[None].to(device, dtype), None
        if guided:
            tts.load_prefix(tts_cache, UNCONDITIONAL, preset.neg_tts.layers)
            h_neg = preset.neg_tts.last_hidden[None].to(device, dtype)
        lm_pos, pos, neg_pos = preset.lm.length, preset.tts.length, preset.neg_tts.length
        text_type, speech_type = m.tts_input_types.weight[[TEXT_TYPE, SPEECH_TYPE]]
        scheduler = self.sampler.make_scheduler()
        acoustic_cache, made = None, 0
        for start in count(0, TEXT_WINDOW):  # ends by max_frames at the latest
            window = text[start:start + TEXT_WINDOW]
            if window:
                n = len(window)
                ids = torch.tensor([window], device=device)
                hidden = lm.forward(lm.embed(ids), [list(range(lm_pos, lm_pos + n))],
                                    [PROMPTED], lm_cache, every=True)
                h_pos = tts.forward(hidden + text_type, [list(range(pos, pos + n))],
                                    [PROMPTED], tts_cache)
                lm_pos, pos = lm_pos + n, pos + n
            for _ in range(SPEECH_WINDOW):
                if cancelled is not None and cancelled():
                    return
                latent = self.sampler.sample(h_pos, h_neg, scheduler, cfg_scale, steps)
                scaled = latent / m.latent_scaling_factor - m.latent_bias_factor
                decoded = m.audio_tower.decoder(scaled.permute(0, 2, 1), use_cache=True,
                                                padding_cache=acoustic_cache)
                acoustic_cache = decoded.padding_cache
                yield decoded.audio[0, 0]
                made += 1
                if made == max_frames:
                    return
                embed = m.multi_modal_projector(latent) + speech_type
                if guided:  # both branches take the same frame, each at its own position
                    h = tts.forward(embed.expand(2, -1, -1), [[pos], [neg_pos]],
                                    [PROMPTED, UNCONDITIONAL], tts_cache)
                    h_pos, h_neg = h[:1], h[1:]
                    neg_pos += 1
                else:
                    h_pos = tts.forward(embed, [[pos]], [PROMPTED], tts_cache)
                pos += 1
                if self.model.tts_eos_classifier(h_pos)[0] > 0.5:
                    return

    def close(self) -> None:
        pass
