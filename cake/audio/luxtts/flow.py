"""ZipVoice-Distill's flow-matching model: phoneme embeddings through a Zipformer text encoder,
spread evenly over the frames the utterance is given; a Zipformer decoder predicts the velocity
from (noisy frames, text condition, reference-clip features), with time and guidance-scale
embeddings (the distilled model folds classifier-free guidance into one pass); an Euler solver
integrates from noise at t=0 to features at t=1."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from cake.audio.luxtts.zipformer import TTSZipformer


class FlowModel(nn.Module):
    def __init__(self, cfg: dict, vocab_size: int, pad_id: int):
        super().__init__()
        heads = dict(query_head_dim=cfg["query_head_dim"], pos_head_dim=cfg["pos_head_dim"],
                     value_head_dim=cfg["value_head_dim"], pos_dim=cfg["pos_dim"])
        feat = cfg["feat_dim"]
        self.feat_dim, self.pad_id = feat, pad_id
        self.embed = nn.Embedding(vocab_size, cfg["text_embed_dim"])
        self.text_encoder = TTSZipformer(
            cfg["text_embed_dim"], feat, 1, cfg["text_encoder_num_layers"],
            cfg["text_encoder_cnn_module_kernel"], cfg["text_encoder_dim"],
            num_heads=cfg["text_encoder_num_heads"],
            feedforward_dim=cfg["text_encoder_feedforward_dim"], **heads)
        self.fm_decoder = TTSZipformer(
            3 * feat, feat, cfg["fm_decoder_downsampling_factor"], cfg["fm_decoder_num_layers"],
            cfg["fm_decoder_cnn_module_kernel"], cfg["fm_decoder_dim"],
            num_heads=cfg["fm_decoder_num_heads"], feedforward_dim=cfg["fm_decoder_feedforward_dim"],
            time_embed_dim=cfg["time_embed_dim"], guidance_embed=True, **heads)

    def encode_text(self, tokens: list[int]) -> Tensor:
        """(len(tokens) + 1, feat): the encoder runs with one trailing pad position, masked
        as a key, whose output fills the frames left over by the even split."""
        device = self.embed.weight.device
        ids = torch.tensor([tokens + [self.pad_id]], device=device)
        mask = torch.zeros(1, len(tokens) + 1, dtype=torch.bool, device=device)
        mask[0, -1] = True
        return self.text_encoder(self.embed(ids), padding_mask=mask)[0]

    def frame_count(self, n_tokens: int, prompt_tokens: int, prompt_frames: int,
                    speed: float) -> int:
        """The frames of prompt + utterance: the prompt's frames per token, scaled by 1/speed.
        float32 arithmetic, as the reference computes it."""
        rate = torch.tensor(prompt_frames) / torch.tensor(prompt_tokens)
        return prompt_frames + int(torch.ceil(rate * n_tokens / speed))

    def text_condition(self, tokens: list[int], frames: int) -> Tensor:
        """(1, frames, feat): each token's encoding repeated frames // len(tokens) times."""
        enc = self.encode_text(tokens)
        each = frames // len(tokens)
        index = torch.arange(frames, device=enc.device)
        index = index // each if each else torch.full_like(index, len(tokens))
        return enc[index.clamp(max=len(tokens))][None]

    def velocity(self, t: Tensor, x: Tensor, text: Tensor, speech: Tensor,
                 guidance: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        b = x.shape[0]
        return self.fm_decoder(torch.cat([x, text, speech], dim=2), t.reshape(1).expand(b),
                               padding_mask, guidance.reshape(1).expand(b))

    @torch.inference_mode()
    def sample(self, noise: Tensor, text: Tensor, speech: Tensor, steps: int, guidance: float,
               t_shift: float, cancelled: Optional[Callable[[], bool]] = None
               ) -> Optional[Tensor]:
        """Euler from noise (1, frames, feat) to features; None when cancelled."""
        t = torch.linspace(0.0, 1.0, steps + 1, device=noise.device)
        t = t_shift * t / (1 + (t_shift - 1) * t)
        g = torch.tensor(guidance, device=noise.device)
        x = noise
        for i in range(steps):
            if cancelled is not None and cancelled():
                return None
            v = self.velocity(t[i], x, text, speech, g)
            x1 = x + (1.0 - t[i]) * v
            x = x1 if i == steps - 1 else (1.0 - t[i + 1]) * (x - t[i] * v) + t[i + 1] * x1
        return x

