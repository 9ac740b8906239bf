"""VibeVoice's generation loop, one speech frame (7.5 per second of audio) per step:

  language model step -> greedy choice among the speech tokens -> stop, or:
  diffusion head (classifier-free guided, DPM-Solver) -> acoustic latent
  -> acoustic decoder (streaming, with its convolution cache) -> audio chunk
  -> semantic encoder of that audio + connectors -> the next step's input embedding

It follows transformers' VibeVoiceGenerationMixin step for step (same random draws, so a
seeded run gives the same audio) but runs the prompted and unconditional branches of the
guidance as one batch of two rows, computes logits only for the speech tokens, drops the
unconditional branch when cfg_scale is 1, and yields each frame's audio as it is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from cake.audio.vibevoice.lm import PROMPTED, UNCONDITIONAL, SpeechLM


@dataclass
class SpeechTokens:
    audio_bos: int  # starts a speech segment
    audio_eos: int  # ends it
    audio: int  # "one more frame": its embedding is replaced by the frame's latents
    eos: int

    def ids(self) -> list[int]:
        return [self.audio_bos, self.audio_eos, self.audio, self.eos]


class LatentSampler:
    """The diffusion head's loop: hidden states -> one acoustic latent (classifier-free guided,
    DPM-Solver), shared by VibeVoice and VibeVoice-Realtime."""

    def __init__(self, head, latent_size: int, scheduler_args: dict):
        self.head, self.latent_size, self.scheduler_args = head, latent_size, scheduler_args
        self._timesteps: dict = {}

    def make_scheduler(self):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(**self.scheduler_args)

    def timestep_embeddings(self, scheduler, steps: int, like: torch.Tensor):
        """The head's timestep embeddings for a step count: the same for every frame."""
        key = (steps, like.device, like.dtype)
        if key not in self._timesteps:
            head = self.head
            scheduler.set_timesteps(num_inference_steps=steps)
            t = scheduler.timesteps.to(like)
            self._timesteps[key] = head.timestep_proj(head.timestep_embedding(t).to(t.dtype))
        return self._timesteps[key]

    def sample(self, h_pos, h_neg, scheduler, cfg_scale: float, steps: int):
        """Denoise one acoustic latent [1, 1, latent] conditioned on the hidden states.
        transformers' head projects the condition and embeds the timestep at every step;
        here the condition is projected once per frame and the embeddings once per run."""
        head = self.head
        condition = head.cond_proj(h_pos if h_neg is None else torch.cat([h_pos, h_neg]))
        t_embeds = self.timestep_embeddings(scheduler, steps, condition)
        # transformers draws noise for both rows and keeps the first: draw alike, so that a
        # seeded run matches it sample for sample.
        x = torch.randn(2, self.latent_size).to(condition)[:1]
        scheduler.set_timesteps(num_inference_steps=steps)
        rows = condition.shape[0]
        for i, t in enumerate(scheduler.timesteps):
            c = condition + t_embeds[i]
            hidden = head.noisy_images_proj(x).expand(rows, -1)
            for layer in head.layers:
                hidden = layer(hidden, c)
            eps = head.final_layer(hidden, c)
            if rows == 2:
                cond_eps, uncond_eps = eps[:1], eps[1:]
                eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
            x = scheduler.step(eps, t, x).prev_sample
        return x.unsqueeze(1)


class FrameGenerator:
    def __init__(self, model, lm: SpeechLM, tokens: SpeechTokens, scheduler_args: dict):
        self.vv = model.model  # transformers' VibeVoiceModel: towers, connectors, head
        self.lm, self.tokens = lm, tokens
        self.scheduler_args = scheduler_args
        self.sampler = LatentSampler(self.vv.diffusion_head, model.config.audio_config.hidden_size,
                                     scheduler_args)

    @torch.inference_mode()
    def frames(self, prompt: torch.Tensor, cfg_scale: float, diffusion_steps: int,
               max_frames: int, cancelled: Optional[Callable[[], bool]] = None
               ) -> Iterator[torch.Tensor]:
        """prompt: input embeddings [1, L, D] ending with the speech-start token. Yields the
        audio of each frame ([hop] samples at 24 kHz) until the model ends its speech,
        max_frames, or `cancelled` is set."""
        try:
            yield from self._frames(prompt, cfg_scale, diffusion_steps, max_frames, cancelled)
        finally:
            self.lm.release()

    def _frames(self, prompt, cfg_scale, diffusion_steps, max_frames, cancelled):
        lm, vv = self.lm, self.vv
        guided = cfg_scale != 1.0
        length = prompt.shape[1]
        cache = lm.new_cache(length + max_frames + 1)
        scheduler = self.sampler.make_scheduler()
        h_pos = lm.forward(prompt, [list(range(length))], [PROMPTED], cache)
        h_neg = None
        if guided:  # the unconditional branch starts from the speech-start token alone
            bos = lm.embed(torch.tensor([[self.tokens.audio_bos]], device=prompt.device))
            h_neg = lm.forward(bos, [[0]], [UNCONDITIONAL], cache)
        pos, neg_pos = length, 1
        acoustic_cache = semantic_cache = None
        for frame in range(max_frames):
            if cancelled is not None and cancelled():
                return
            if lm.choose(h_pos)[0] != self.tokens.audio:
                return
            latent = self.sampler.sample(h_pos, h_neg, scheduler, cfg_scale, diffusion_steps)
            scaled = latent / vv.latent_scaling_factor - vv.latent_bias_factor
            decoded = vv.audio_tower.decode(scaled, padding_cache=acoustic_cache, use_cache=True)
            acoustic_cache = decoded.padding_cache
            yield decoded.audio[0, 0]
            if frame == max_frames - 1:
                return
            semantic = vv.semantic_tokenizer_encoder(decoded.audio, padding_cache=semantic_cache,
                                                     use_cache=True)
            semantic_cache = semantic.padding_cache
            embed = vv.multi_modal_projector(latent) + vv.semantic_connector(semantic.latents)
            if guided:  # both branches take the same frame, each at its own position
                h = lm.forward(embed.expand(2, -1, -1), [[pos], [neg_pos]],
                               [PROMPTED, UNCONDITIONAL], cache)
                h_pos, h_neg = h[:1], h[1:]
                neg_pos += 1
            else:
                h_pos = lm.forward(embed, [[pos]], [PROMPTED], cache)
            pos += 1
