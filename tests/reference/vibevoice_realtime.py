"""Reference outputs of Microsoft's VibeVoice-Realtime implementation for the tiny random
checkpoint of tests/speech_models.py, which tests/test_speech_realtime.py compares cake
against. It runs in its own environment, never cake's: the reference needs transformers 4.51
and PyPI's `vibevoice` 0.0.1 lacks the streaming modules, so it runs Microsoft's GitHub source
(microsoft/VibeVoice at e73d1e17c3754f046352014856a922f8208fb5d3) from PYTHONPATH:

  python3 -m venv /work/refenv-vibevoice
  /work/refenv-vibevoice/bin/pip install torch==2.13.0 transformers==4.51.3 diffusers \
      numpy scipy tqdm safetensors accelerate
  PYTHONPATH=$PWD /work/main/.venv/bin/python tests/speech_models.py /tmp/rt-tiny
  PYTHONPATH=/path/to/VibeVoice /work/refenv-vibevoice/bin/python \
      tests/reference/vibevoice_realtime.py /tmp/rt-tiny tests/reference/data

It writes data/realtime-voice.pt, a voice preset in Microsoft's format (torch.save of the four
prefilled model outputs with their DynamicCaches, made here from a short prompt), and
data/realtime-audio.npz: the audio of seeded generations with that preset (guided and not,
and with the end-of-speech classifier forced to fire), the settings and the checkpoint's sha256.
"""
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from vibevoice.modular.modeling_vibevoice_streaming_inference import (
    VibeVoiceCausalLMOutputWithPast, VibeVoiceStreamingForConditionalGenerationInference)

TEXT = "Hello world, this is a test of speech."
SEED, STEPS, MAX_NEW_TOKENS = 7, 5, 40


class Ids:
    """What generate() reads from its tokenizer: only special token ids (placeholders whose
    embeddings are always replaced)."""
    bos_token_id = eos_token_id = pad_token_id = 0
    speech_start_id = speech_end_id = speech_diffusion_id = 0

    def __init__(self, neg_id):
        self.neg_id = neg_id

    def convert_tokens_to_ids(self, token):
        return self.neg_id


def load(folder: Path):
    model, info = VibeVoiceStreamingForConditionalGenerationInference.from_pretrained(
        folder, torch_dtype=torch.float32, output_loading_info=True)
    # cake's checkpoint has no acoustic encoder (the realtime model never encodes audio).
    missing = [k for k in info["missing_keys"] if ".acoustic_tokenizer.encoder." not in k]
    assert not missing and not info["unexpected_keys"], (missing, info["unexpected_keys"])
    return model.eval()


@torch.no_grad()
def make_preset(model, tok: Tokenizer, neg_id: int) -> dict:
    """A voice prompt's four prefilled outputs: text through the text LM and the TTS LM, then
    three speech frames through the TTS LM; the negative branch from one token."""
    m = model.model
    ids = torch.tensor([tok.encode(" Voice input: Speaker 0:").ids])
    lm = model.forward_lm(input_ids=ids, use_cache=True, return_dict=True)
    tts = model.forward_tts_lm(input_ids=ids, lm_last_hidden_state=lm.last_hidden_state,
                               tts_text_masks=torch.ones(1, 1), use_cache=True, return_dict=True)
    torch.manual_seed(1)
    speech = m.acoustic_connector(torch.randn(1, 3, model.config.acoustic_vae_dim))
    more = model.forward_tts_lm(input_ids=torch.ones(1, 3, dtype=torch.long),
                                past_key_values=tts.past_key_values, lm_last_hidden_state=speech,
                                tts_text_masks=torch.zeros(1, 1), use_cache=True,
                                return_dict=True)
    tts_lm = VibeVoiceCausalLMOutputWithPast(
        logits=more.logits, past_key_values=more.past_key_values,
        last_hidden_state=torch.cat([tts.last_hidden_state, more.last_hidden_state], 1))
    neg = torch.tensor([[neg_id]])
    neg_lm = model.forward_lm(input_ids=neg, use_cache=True, return_dict=True)
    neg_tts = model.forward_tts_lm(input_ids=neg, lm_last_hidden_state=neg_lm.last_hidden_state,
                                   tts_text_masks=torch.ones(1, 1), use_cache=True,
                                   return_dict=True)
    return {"lm": lm, "tts_lm": tts_lm, "neg_lm": neg_lm, "neg_tts_lm": neg_tts}


@torch.no_grad()
def generate(model, preset, text_ids, neg_id, cfg_scale, max_new_tokens=MAX_NEW_TOKENS):
    """As demo/realtime_model_inference_from_file.py does, the processor's placeholder ids
    written out here."""
    lm_len = preset["lm"]["last_hidden_state"].shape[1]
    tts_len = preset["tts_lm"]["last_hidden_state"].shape[1]
    model.set_ddpm_inference_steps(STEPS)
    torch.manual_seed(SEED)
    out = model.generate(
        input_ids=torch.zeros(1, lm_len, dtype=torch.long),
        attention_mask=torch.ones(1, lm_len, dtype=torch.long),
        tts_lm_input_ids=torch.zeros(1, tts_len, dtype=torch.long),
        tts_lm_attention_mask=torch.ones(1, tts_len, dtype=torch.long),
        tts_text_ids=torch.tensor([text_ids]), tokenizer=Ids(neg_id), cfg_scale=cfg_scale,
        all_prefilled_outputs=copy.deepcopy(preset), max_new_tokens=max_new_tokens,
        return_speech=True, show_progress_bar=False)
    return out.speech_outputs[0].reshape(-1).float().numpy()


def main(folder: Path, out: Path):
    model = load(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    neg_id = tok.token_to_id("<|vision_pad|>")
    preset = make_preset(model, tok, neg_id)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(preset, out / "realtime-voice.pt")
    text_ids = tok.encode(TEXT.strip() + "\n", add_special_tokens=False).ids
    guided = generate(model, preset, text_ids, neg_id, 1.5)
    plain = generate(model, preset, text_ids, neg_id, 1.0)
    with torch.no_grad():
        model.tts_eos_classifier.fc2.bias.fill_(8.0)  # now it fires at once
    ended = generate(model, preset, text_ids, neg_id, 1.5)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    np.savez_compressed(out / "realtime-audio.npz", guided=guided, plain=plain, ended=ended,
                        settings=json.dumps({"text": TEXT, "seed": SEED, "steps": STEPS,
                                             "max_new_tokens": MAX_NEW_TOKENS,
                                             "checkpoint_sha256": digest}))
    print(f"{len(guided)} / {len(plain)} / {len(ended)} samples; checkpoint {digest}")


def bench(folder: Path, text: str, max_new_tokens: int, repeats: int):
    """benchmarks/bench_speech_realtime.py's reference side: one JSON line, the audio made
    and the seconds of each timed generate() after a warm-up."""
    model = load(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    neg_id = tok.token_to_id("<|vision_pad|>")
    preset = make_preset(model, tok, neg_id)  # for the tiny model, data/realtime-voice.pt
    torch.save(preset, folder / "bench-voice.pt")  # what cake reads, as it reads Microsoft's
    text_ids = tok.encode(text.strip() + "\n", add_special_tokens=False).ids
    seconds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        audio = generate(model, preset, text_ids, neg_id, 1.5, max_new_tokens)
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"samples": len(audio), "seconds": seconds[1:], "audio": audio.tolist()}))


if __name__ == "__main__":
    if sys.argv[1] == "bench":
        bench(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
