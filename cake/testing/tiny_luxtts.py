"""A tiny random-weight LuxTTS checkpoint in the Hub's layout (config.json, tokens.txt,
model.pt, vocoder/config.yaml + vocoder/vocos.bin), built offline and deterministically, for
tests and benchmarks. Its tokens are the espeak-ng phoneme characters of a small English corpus,
so real text reaches the model. The vocoder file also holds the buffers LinaCodec's own Vocos
class expects (its mel extractor's window and filters, the ISTFT windows), so the reference
implementation loads it strictly."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

# The real model's U-Net of five stacks (frame rates 1, 1/2, 1/4, 1/2, 1), two layers where
# the real one has several, at tiny widths.
MODEL = {"fm_decoder_downsampling_factor": [1, 2, 4, 2, 1],
         "fm_decoder_num_layers": [2, 1, 1, 1, 2], "fm_decoder_cnn_module_kernel": [7, 5, 3, 5, 7],
         "fm_decoder_feedforward_dim": 48,
         "fm_decoder_num_heads": 2, "fm_decoder_dim": 32, "text_encoder_num_layers": 2,
         "text_encoder_feedforward_dim": 32, "text_encoder_cnn_module_kernel": 3,
         "text_encoder_num_heads": 2, "text_encoder_dim": 16, "time_embed_dim": 16,
         "text_embed_dim": 16, "query_head_dim": 8, "value_head_dim": 4, "pos_head_dim": 4,
         "pos_dim": 8, "feat_dim": 100}
# ZipVoice's own defaults (k2-fsa's ZipVoice class), the shape of the 123M-parameter LuxTTS
REAL_MODEL = {"fm_decoder_downsampling_factor": [1, 2, 4, 2, 1],
              "fm_decoder_num_layers": [2, 2, 4, 4, 4],
              "fm_decoder_cnn_module_kernel": [31, 15, 7, 15, 31],
              "fm_decoder_feedforward_dim": 1536, "fm_decoder_num_heads": 4,
              "fm_decoder_dim": 512, "text_encoder_num_layers": 4,
              "text_encoder_feedforward_dim": 512, "text_encoder_cnn_module_kernel": 9,
              "text_encoder_num_heads": 4, "text_encoder_dim": 192, "time_embed_dim": 192,
              "text_embed_dim": 192, "query_head_dim": 32, "value_head_dim": 12,
              "pos_head_dim": 4, "pos_dim": 48, "feat_dim": 100}
FEATURE = {"type": "vocos", "sampling_rate": 24000, "feat_scale": 0.1}
VOCODER_YAML = """\
feature_extractor:
  class_path: vocos.feature_extractors.MelSpectrogramFeatures
  init_args: {sample_rate: 24000, n_fft: 1024, hop_length: 256, n_mels: 100, padding: center}
backbone:
  class_path: vocos.models.VocosBackbone
  init_args: {input_channels: 100, dim: 64, intermediate_dim: 96, num_layers: 2}
head:
  class_path: vocos.heads.ISTFTHead
  init_args: {dim: 64, n_fft: 1024, hop_length: 256, padding: same}
upsampler:
  class_path: linacodec.vocoder.upsampler_block.UpSamplerBlock
  init_args: {in_channels: 64, upsample_factors: [2], kernel_sizes: [4]}
head_48k:
  class_path: vocos.heads.ISTFTHead
  init_args: {dim: 64, n_fft: 1024, hop_length: 256, padding: same}
"""
# Phonemes of a few sentences (espeak-ng en-us), so tokens.txt covers ordinary English.
PHONEMES = sorted(set("ðɪsɪzə tɛst ʌv spiːtʃ. hɛloʊ wɜːld, haʊ ɑːɹ juː? aɪ θɪŋk soʊ! "
                      "ˈˌːɐɑɔəɛɜɪʊʌæŋɹɾʃʒθðʔɚɝᵻɫabdefhijklmnoprstuvwxz!',.:;?-\u0303\u0329")
                - {"_"})


def tokens_text() -> str:
    return "_\t0\n" + "".join(f"{p}\t{i}\n" for i, p in enumerate(PHONEMES, start=1))


def _perturbed(module: torch.nn.Module, seed: int, relative: bool = False) -> dict:
    """The module's state with every parameter moved off its initial value (zero biases and
    unit scales would hide mistakes). At LuxTTS's real depth an added 0.05 makes the random
    network chaotic (a 1e-6 change of the input moves the output by its own size, in the
    reference too), so there each value is scaled by 1 + 0.05 noise instead."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in module.state_dict().items():
        noise = 0.05 * torch.randn(p.shape, generator=g)
        state[name] = (p * (1 + noise) if relative else p + noise).contiguous()
    return state


def write_luxtts(folder: Path, real_size: bool = False) -> str:
    """Write the tiny checkpoint (or one of LuxTTS's shape: ZipVoice's default dimensions and
    a 512-wide, 8-block Vocos); returns a sha256 over its files."""
    from cake.audio.luxtts.features import mel_filters
    from cake.audio.luxtts.flow import FlowModel
    from cake.audio.luxtts.checkpoint import vocoder_config
    from cake.audio.luxtts.vocoder import Vocoder

    folder = Path(folder)
    (folder / "vocoder").mkdir(parents=True, exist_ok=True)
    model = REAL_MODEL if real_size else MODEL
    (folder / "config.json").write_text(json.dumps({"model": model, "feature": FEATURE},
                                                   indent=1))
    (folder / "tokens.txt").write_text(tokens_text(), encoding="utf-8")
    yaml = VOCODER_YAML
    if real_size:
        yaml = (yaml.replace("dim: 64, intermediate_dim: 96, num_layers: 2",
                             "dim: 512, intermediate_dim: 1536, num_layers: 8")
                .replace("{dim: 64,", "{dim: 512,").replace("in_channels: 64", "in_channels: 512"))
    (folder / "vocoder" / "config.yaml").write_text(yaml)
    torch.manual_seed(0)
    flow = FlowModel(model, vocab_size=len(PHONEMES) + 1, pad_id=0)
    torch.save({"model": _perturbed(flow, 1, relative=real_size)}, folder / "model.pt")
    vocoder = Vocoder(**vocoder_config(folder / "vocoder" / "config.yaml"))
    state = _perturbed(vocoder, 2, relative=real_size)
    for head, n_fft in (("head", 1024), ("head_48k", 1024)):
        state[f"{head}.istft.window"] = torch.hann_window(n_fft)
    state["feature_extractor.mel_spec.spectrogram.window"] = torch.hann_window(1024)
    state["feature_extractor.mel_spec.mel_scale.fb"] = mel_filters()
    torch.save(state, folder / "vocoder" / "vocos.bin")
    digest = hashlib.sha256()
    for name in ("config.json", "tokens.txt", "model.pt", "vocoder/config.yaml",
                 "vocoder/vocos.bin"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


if __name__ == "__main__":
    import sys

    print(write_luxtts(Path(sys.argv[1]), real_size="--real-size" in sys.argv))
