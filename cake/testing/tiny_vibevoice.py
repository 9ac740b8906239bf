"""Random-weight VibeVoice checkpoints built offline, for tests and benchmarks: a tiny one,
or one of the real 1.5B shape. A random language model picks its tokens at random, so
`speaking` rigs it to always choose "one more speech frame": one hidden dimension carries a
constant positive value that no layer writes to, and only the speech-frame token's head row
reads it."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]


def write_tokenizer(folder: Path, vocab_size: int = 320):
    """A small byte-level BPE with Qwen2.5's speech (vision) special tokens, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Transform the text provided by various speakers into speech output, utilizing "
              "the distinct voice of each respective speaker.", "Voice input: Speaker 0:",
              "Text input:", "Speech output:", "Hello world, this is a test of speech."]
    tok.train_from_iterator(corpus * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def tiny_config(tokenizer, **text_overrides):
    from transformers import VibeVoiceConfig

    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    text = dict(model_type="qwen2", vocab_size=tokenizer.get_vocab_size(), hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False)
    text.update(text_overrides)
    tower = dict(hidden_size=16, num_filters=8, downsampling_ratios=[4, 5, 8], depths=[1, 1, 1, 1],
                 layer_scale_init_value=1.0, initializer_range=0.2)
    return VibeVoiceConfig(
        text_config=text,
        audio_config=dict(model_type="vibevoice_acoustic_tokenizer", **tower),
        semantic_model_config=dict(model_type="vibevoice_acoustic_tokenizer_encoder", **tower),
        diffusion_head_config=dict(num_hidden_layers=2, intermediate_size=128),
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        audio_bos_token_id=ids["<|vision_start|>"], audio_eos_token_id=ids["<|vision_end|>"],
        audio_token_id=ids["<|vision_pad|>"])


def real_config(vocab_size: int = 151936):
    """The shape of VibeVoice-1.5B (Qwen2.5-1.5B language model)."""
    from transformers import VibeVoiceConfig

    text = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=1536,
                intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, max_position_embeddings=65536, rope_theta=1e6,
                tie_word_embeddings=True)
    tower = dict(hidden_size=64, num_filters=32, downsampling_ratios=[2, 2, 4, 5, 5, 8],
                 depths=[3, 3, 3, 3, 3, 3, 8])
    return VibeVoiceConfig(
        text_config=text,
        audio_config=dict(model_type="vibevoice_acoustic_tokenizer", **tower),
        semantic_model_config=dict(model_type="vibevoice_acoustic_tokenizer_encoder",
                                   **{**tower, "hidden_size": 128}),
        diffusion_head_config=dict(num_hidden_layers=4, intermediate_size=4608))


@torch.no_grad()
def make_speak(model) -> None:
    """Rig a random model to emit speech frames at every step (see the module docstring)."""
    lm, cfg = model.model.language_model, model.config
    lm.embed_tokens.weight[:, 0] = 1.0
    for layer in lm.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.down_proj.weight[0] = 0.0
    for connector in (model.model.multi_modal_projector, model.model.semantic_connector):
        connector.linear_2.weight[0] = 0.0
        connector.linear_2.bias[0] = 0.5
    if cfg.tie_word_embeddings:
        raise ValueError("rigging needs an untied head")
    model.lm_head.weight[[cfg.audio_bos_token_id, cfg.audio_eos_token_id, cfg.eos_token_id]] = 0.0
    model.lm_head.weight[cfg.audio_token_id] = 0.0
    model.lm_head.weight[cfg.audio_token_id, 0] = 10.0


def build(config, seed: int = 0, speaking: bool = True, dtype=torch.float32):
    from transformers import VibeVoiceForConditionalGeneration

    torch.manual_seed(seed)
    model = VibeVoiceForConditionalGeneration(config).to(dtype).eval()
    if speaking:
        make_speak(model)
    return model


def write_tiny(folder: Path, seed: int = 0, speaking: bool = True):
    """A tiny random VibeVoice in transformers' layout, with its tokenizer. Returns the model."""
    tokenizer = write_tokenizer(folder)
    model = build(tiny_config(tokenizer), seed=seed, speaking=speaking)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    return model
