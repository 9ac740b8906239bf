"""Tiny random pipelines of every family cake serves, built offline in about a second.

Tests and benchmarks use them in place of real checkpoints (which no test may download):
same classes, same folder layout as a Hub repo, random weights, tokenizers built from an
in-memory byte-level vocabulary.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("sd", "sdxl", "flux1", "flux2")


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: every byte as one printable character."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = byte_alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_alphabet())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def clip_text_encoder(vocab_size: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=vocab_size, projection_dim=32, hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def sd_vae():
    """The VAE of the tiny SD and SDXL pipelines (4 latent channels, two blocks)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=2, sample_size=64)


def sd_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=2)
    vae = sd_vae()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=clip_text_encoder(len(tokenizer)), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sdxl_pipeline():
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=2)
    vae = sd_vae()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(len(tokenizer), with_projection=True),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler)


def flux1_pipeline(guidance_embeds: bool = True):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37,
                                 num_layers=2, num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=1, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=clip_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)


def flux2_pipeline():
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler,
                           Flux2KleinPipeline, Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    # The pipeline stacks the encoder's hidden states 9, 18 and 27: it needs 28 layers, and
    # the transformer sees 3 x hidden_size features per text token.
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
        max_position_embeddings=1024))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3,
                             down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,),
                             layers_per_block=1, latent_channels=1, norm_num_groups=1,
                             use_quant_conv=False, use_post_quant_conv=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)


BUILDERS = {"sd": sd_pipeline, "sdxl": sdxl_pipeline, "flux1": flux1_pipeline,
            "flux2": flux2_pipeline}


def write_tiny_pipeline(folder: Path, arch: str, seed: int = 0) -> Path:
    """Save a tiny random pipeline of `arch` as a diffusers folder (model_index.json + parts)."""
    torch.manual_seed(seed)
    BUILDERS[arch]().save_pretrained(folder)
    return Path(folder)


# -- single-file checkpoints: the inverse of diffusers' from_single_file conversion, for the
# tiny pipelines above (any number of blocks, but only their block types)

def ldm_unet_keys(unet) -> dict[str, str]:
    """diffusers UNet2DConditionModel name -> original LDM name (model.diffusion_model.*)."""
    cfg = unet.config
    per = cfg.layers_per_block + 1  # input/output blocks per resolution (+ the sampler)
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.0": "middle_block.0",
             "mid_block.resnets.1": "middle_block.2"}
    n = len(cfg.block_out_channels)
    for i in range(n):
        for j in range(cfg.layers_per_block):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{per * i + j + 1}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{per * i + j + 1}.1"
        names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{per * (i + 1)}.0.op"
        up_attn = "CrossAttn" in cfg.up_block_types[i]
        for j in range(per):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{per * i + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{per * i + j}.1"
        last = f"output_blocks.{per * i + per - 1}"  # the resolution's last block upsamples
        names[f"up_blocks.{i}.upsamplers.0"] = f"{last}.{2 if up_attn else 1}"
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    out = {}
    for key in unet.state_dict():
        module, leaf = key.rsplit(".", 1)
        prefix = max((p for p in names if module == p or module.startswith(p + ".")), key=len)
        rest = module[len(prefix) + 1:]
        if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
            rest = resnet.get(rest, rest)
        out[key] = ".".join(filter(None, [names[prefix], rest, leaf]))
    return out


def ldm_vae_keys(vae) -> dict[str, str]:
    """diffusers AutoencoderKL name -> original LDM name (without first_stage_model./vae.)."""
    n = len(vae.config.block_out_channels)
    subs = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"),
            ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
            ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
            ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
            ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
            ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"),
            ("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2")]
    for i in range(n):
        subs += [(f"down_blocks.{i}.resnets", f"down.{i}.block"),
                 (f"down_blocks.{i}.downsamplers.0", f"down.{i}.downsample"),
                 (f"up_blocks.{i}.resnets", f"up.{n - 1 - i}.block"),
                 (f"up_blocks.{i}.upsamplers.0", f"up.{n - 1 - i}.upsample")]
    out = {}
    for key in vae.state_dict():
        new = key
        for old, ldm in subs:
            new = new.replace(f".{old}.", f".{ldm}.")
        out[key] = new
    return out


def ldm_vae_state(vae, prefix: str) -> dict[str, torch.Tensor]:
    state = vae.state_dict()
    out = {}
    for key, ldm in ldm_vae_keys(vae).items():
        t = state[key]
        if ".attn_1." in ldm and ldm.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[prefix + ldm] = t
    return out


def clip_state(encoder, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in encoder.state_dict().items() if not k.startswith("text_projection")}


def sd_single_file_state(pipe) -> dict[str, torch.Tensor]:
    """A StableDiffusionPipeline as an original SD 1.x checkpoint (what civitai serves)."""
    unet = pipe.unet.state_dict()
    state = {"model.diffusion_model." + ldm: unet[k] for k, ldm in ldm_unet_keys(pipe.unet).items()}
    state.update(ldm_vae_state(pipe.vae, "first_stage_model."))
    state.update(clip_state(pipe.text_encoder, "cond_stage_model.transformer."))
    return state


def bfl_flux_state(transformer) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel in Black Forest Labs' original layout."""
    s = transformer.state_dict()
    out = {}

    def cat(*names):
        return torch.cat([s[n] for n in names])

    def swap(t):  # BFL's final modulation is (shift, scale), diffusers' (scale, shift)
        scale, shift = t.chunk(2)
        return torch.cat([shift, scale])

    embedders = {"time_in": "time_text_embed.timestep_embedder",
                 "vector_in": "time_text_embed.text_embedder",
                 "guidance_in": "time_text_embed.guidance_embedder"}
    for bfl, ours in embedders.items():
        for p in ("weight", "bias"):
            if f"{ours}.linear_1.{p}" in s:
                out[f"{bfl}.in_layer.{p}"] = s[f"{ours}.linear_1.{p}"]
                out[f"{bfl}.out_layer.{p}"] = s[f"{ours}.linear_2.{p}"]
    for p in ("weight", "bias"):
        out[f"txt_in.{p}"] = s[f"context_embedder.{p}"]
        out[f"img_in.{p}"] = s[f"x_embedder.{p}"]
        out[f"final_layer.linear.{p}"] = s[f"proj_out.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(s[f"norm_out.linear.{p}"])
    for i in range(transformer.config.num_layers):
        d, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[d + f"img_mod.lin.{p}"] = s[b + f"norm1.linear.{p}"]
            out[d + f"txt_mod.lin.{p}"] = s[b + f"norm1_context.linear.{p}"]
            out[d + f"img_attn.qkv.{p}"] = cat(*(b + f"attn.to_{x}.{p}" for x in "qkv"))
            out[d + f"txt_attn.qkv.{p}"] = cat(*(b + f"attn.add_{x}_proj.{p}" for x in "qkv"))
            out[d + f"img_attn.proj.{p}"] = s[b + f"attn.to_out.0.{p}"]
            out[d + f"txt_attn.proj.{p}"] = s[b + f"attn.to_add_out.{p}"]
            out[d + f"img_mlp.0.{p}"] = s[b + f"ff.net.0.proj.{p}"]
            out[d + f"img_mlp.2.{p}"] = s[b + f"ff.net.2.{p}"]
            out[d + f"txt_mlp.0.{p}"] = s[b + f"ff_context.net.0.proj.{p}"]
            out[d + f"txt_mlp.2.{p}"] = s[b + f"ff_context.net.2.{p}"]
        out[d + "img_attn.norm.query_norm.scale"] = s[b + "attn.norm_q.weight"]
        out[d + "img_attn.norm.key_norm.scale"] = s[b + "attn.norm_k.weight"]
        out[d + "txt_attn.norm.query_norm.scale"] = s[b + "attn.norm_added_q.weight"]
        out[d + "txt_attn.norm.key_norm.scale"] = s[b + "attn.norm_added_k.weight"]
    for i in range(transformer.config.num_single_layers):
        d, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[d + f"modulation.lin.{p}"] = s[b + f"norm.linear.{p}"]
            out[d + f"linear1.{p}"] = cat(*(b + f"attn.to_{x}.{p}" for x in "qkv"),
                                          b + f"proj_mlp.{p}")
            out[d + f"linear2.{p}"] = s[b + f"proj_out.{p}"]
        out[d + "norm.query_norm.scale"] = s[b + "attn.norm_q.weight"]
        out[d + "norm.key_norm.scale"] = s[b + "attn.norm_k.weight"]
    return out


def flux_single_file_state(pipe, comfy: bool) -> dict[str, torch.Tensor]:
    """A FluxPipeline as one file: the bare BFL transformer (as black-forest-labs ships
    flux1-dev.safetensors), or Comfy-Org's all-in-one layout (model.diffusion_model.*,
    text_encoders.clip_l.*, text_encoders.t5xxl.*, vae.*)."""
    transformer = bfl_flux_state(pipe.transformer)
    if not comfy:
        return transformer
    state = {"model.diffusion_model." + k: v for k, v in transformer.items()}
    state.update(clip_state(pipe.text_encoder, "text_encoders.clip_l.transformer."))
    state.update({"text_encoders.t5xxl.transformer." + k: v
                  for k, v in pipe.text_encoder_2.state_dict().items()
                  if k != "encoder.embed_tokens.weight"})  # tied to shared.weight
    state.update(ldm_vae_state(pipe.vae, "vae."))
    return state
