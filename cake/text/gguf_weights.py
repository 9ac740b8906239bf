"""A GGUF file (llama.cpp's format) read as a checkpoint with Hugging Face names.

Same interface as SafetensorsCheckpoint (.config, .tensor_names(), .get(name)), plus the
tokenizer and chat template the file carries in its metadata. GGUFReader memory-maps the file,
so a stage dequantizes only the tensors it asks for; .raw(name) keeps the packed blocks for a
quantized kernel.
"""
from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, TokenType
from gguf.gguf_reader import ReaderField
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

log = logging.getLogger(__name__)

# general.architecture -> (config.json model_type, architectures); Falcon3 files say "llama".
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "olmo2": ("olmo2", "Olmo2ForCausalLM"),
    "exaone4": ("exaone4", "Exaone4ForCausalLM"),
    "smollm3": ("smollm3", "SmolLM3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "qwen35": ("qwen3_5_text", "Qwen3_5ForCausalLM"),
    "qwen35moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"),
}
_QWEN35 = {"qwen35", "qwen35moe"}
# Architectures whose converter permutes the Q/K rows (llama.cpp's LlamaModel and its kin).
_PERMUTED = {"llama", "smollm3"}
# Norm layouts whose GGUF names differ from Llama's (attn_norm / ffn_norm).
_POST_NORMS = {"post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
_LAYER_NAMES_BY_ARCH = {
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm", **_POST_NORMS},
    "olmo2": _POST_NORMS,
    "exaone4": _POST_NORMS,
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "qwen3moe": {"ffn_gate_inp": "mlp.gate"},
}
_SHARED_EXPERT = {"ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
                  "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                  "ffn_up_shexp": "mlp.shared_expert.up_proj",
                  "ffn_down_shexp": "mlp.shared_expert.down_proj"}
# Qwen3.5's Gated DeltaNet layers (ssm_a, ssm_dt.bias: see GGUFCheckpoint._qwen35_names).
_DELTANET = {"attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z",
             "ssm_beta": "linear_attn.in_proj_b", "ssm_alpha": "linear_attn.in_proj_a",
             "ssm_conv1d": "linear_attn.conv1d", "ssm_norm": "linear_attn.norm",
             "ssm_out": "linear_attn.out_proj", "post_attention_norm": "post_attention_layernorm"}
for _arch in _QWEN35:
    _LAYER_NAMES_BY_ARCH[_arch] = {**_SHARED_EXPERT, **_DELTANET}
# A layer's experts as one [experts, rows, cols] tensor -> the per-expert matrix name.
_EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                   "ffn_down_exps": "down_proj"}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; unknown names pass."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    names = {**_LAYER_NAMES, **_LAYER_NAMES_BY_ARCH.get(arch, {})}
    if m and m[2] in names:
        return f"model.layers.{m[1]}.{names[m[2]]}.{m[3]}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    return gguf_name


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute of Q/K rows for llama, which interleaves the two
    rotary halves of each head: reshape(n_head, 2, d/2, ...).swapaxes(1, 2)."""
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


class _Reader(GGUFReader):
    """GGUFReader reading through a plain array view of its memory map: np.memmap's
    bookkeeping on each of the ~250k small slices of a 49k-token vocabulary made opening a
    GGUF the largest part of a second start (~4x its time). Tensors stay views of the map."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if getattr(self, "_mapped", None) is not self.data:
            self._mapped, self._plain = self.data, self.data.view(np.ndarray)
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        arr = self._plain[offset:end].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(override_order or self.byte_order))

    def __init__(self, path):
        super().__init__(path)
        for name, field in self.fields.items():
            if isinstance(field.parts[-1], _StringArray):
                self.fields[name] = _StringArrayField(field.offset, name, field.parts,
                                                      field.data, field.types)

    def _get_field_parts(self, orig_offs, raw_type):
        """Arrays in one step: a scalar array as one view (not a view per value); a string
        array (a vocabulary's tokens and merges, ~100k strings) only measured here, its
        strings decoded when asked for (_StringArrayField), not held as ~200k small arrays:
        most of a second start went to making them, and to the garbage collector's pass
        over them."""
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        if n == 0 or (nptype is None and itype != GGUFValueType.STRING):
            return super()._get_field_parts(orig_offs, raw_type)  # (nested arrays, empty)
        if nptype is not None:
            values = self._get(offs, nptype, n)
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]
        strings = _StringArray(self._plain, offs, n)
        return 12 + strings.nbytes, [raw_itype, alen, strings], [2], [GGUFValueType.ARRAY, itype]


class _StringArray:
    """n length-prefixed UTF-8 strings from offset `start` of a GGUF's bytes, decoded once
    when first asked for (the tokenizer reads the vocabulary several times)."""

    def __init__(self, data: np.ndarray, start: int, n: int):
        self.data, self.start, self.n = data, start, n
        unpack, offs = struct.Struct("<Q").unpack_from, start
        for _ in range(n):
            offs += 8 + unpack(data, offs)[0]
        self.nbytes = offs - start
        self._strings: Optional[list[str]] = None

    def strings(self) -> list[str]:
        if self._strings is None:
            unpack, buf, offs, out = struct.Struct("<Q").unpack_from, self.data, self.start, []
            raw = memoryview(buf)
            for _ in range(self.n):
                size = unpack(buf, offs)[0]
                out.append(str(raw[offs + 8:offs + 8 + size], "utf-8"))
                offs += 8 + size
            self._strings = out
        return self._strings


class _StringArrayField(ReaderField):
    """A ReaderField whose string array is decoded from the file's bytes when first read."""

    def contents(self, index_or_slice=slice(None)):
        strings = self.parts[-1].strings()
        # a copy for a slice: callers may change what they are given
        return strings[index_or_slice]


class GGUFCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = _Reader(self.path)
        self.arch = self.meta("general.architecture")
        if self.arch not in ARCHS:
            raise ValueError(f"unsupported GGUF architecture {self.arch!r}; "
                             f"supported: {', '.join(sorted(ARCHS))}")
        self._tensors = {hf_name(t.name, self.arch): t for t in self._reader.tensors}
        self._split_experts()
        if self.arch in _QWEN35:
            self._qwen35_names()
        # llama.cpp stores Llama 3.1's rope scaling as a tensor of per-frequency divisors,
        # Phi-3's longrope as two tensors of them.
        self._rope_freqs = self._tensors.pop("rope_freqs.weight", None)
        self._rope_factors = {k: self._tensors.pop(f"rope_factors_{k}.weight", None)
                              for k in ("long", "short")}
        self.config = self._build_config()

    def _split_experts(self) -> None:
        """blk.N.ffn_gate_exps [E, F, D] -> E matrices model.layers.N.mlp.experts.E.gate_proj,
        views of the file's packed rows (a quant block never spans two rows)."""
        for name in [n for n in self._tensors if n.startswith("blk.")]:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
            if m is None or m[2] not in _EXPERT_TENSORS:
                continue
            t = self._tensors.pop(name)
            for e in range(t.data.shape[0]):
                expert = f"model.layers.{m[1]}.mlp.experts.{e}.{_EXPERT_TENSORS[m[2]]}.weight"
                self._tensors[expert] = SimpleNamespace(
                    name=expert, data=t.data[e], tensor_type=t.tensor_type, shape=t.shape[:2],
                    n_bytes=int(t.data[e].nbytes), n_elements=int(t.n_elements) // len(t.data))

    def _qwen35_names(self) -> None:
        """The two DeltaNet parameters whose GGUF names do not follow the weight/bias rule."""
        for name in list(self._tensors):
            m = re.fullmatch(r"blk\.(\d+)\.(ssm_a|ssm_dt\.bias)", name)
            if m:
                ours = "A_log" if m[2] == "ssm_a" else "dt_bias"
                self._tensors[f"model.layers.{m[1]}.linear_attn.{ours}"] = self._tensors.pop(name)

    def meta(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    # --- model -------------------------------------------------------------------------

    def _build_config(self) -> dict:
        a = lambda key, default=None: self.meta(f"{self.arch}.{key}", default)  # noqa: E731
        model_type, architecture = ARCHS[self.arch]
        heads = a("attention.head_count")
        names = self._tensors
        cfg = {
            "model_type": model_type,
            "architectures": [architecture],
            "vocab_size": int(self._tensors["model.embed_tokens.weight"].shape[1]),
            "hidden_size": a("embedding_length"),
            "intermediate_size": a("feed_forward_length"),
            "num_hidden_layers": a("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": a("attention.head_count_kv", heads),
            "rms_norm_eps": _f32(a("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _f32(a("rope.freq_base", 10000.0)),
            "max_position_embeddings": a("context_length", 4096),
            # llama.cpp writes the output projection only when it is not the embedding matrix.
            "tie_word_embeddings": "lm_head.weight" not in names,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._eos_ids(),
        }
        if a("attention.key_length") is not None:
            cfg["head_dim"] = a("attention.key_length")
        if a("attention.sliding_window") is not None:
            cfg["sliding_window"] = a("attention.sliding_window")
        if self.arch in ("llama", "smollm3"):
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in names
            cfg["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in names
        scaling = self._rope_scaling(cfg)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
        self._family_config(cfg, a)
        return cfg

    def _family_config(self, cfg: dict, a) -> None:
        """What llama.cpp keeps or assumes for each family that config.json says otherwise."""
        n, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
        if self.arch == "gemma3":
            # llama.cpp: every 6th layer global, sliding ones at base 10000 unless the file
            # says; the score scale is head_dim^-1/2 (27B: (hidden/heads)^-1/2); norms hold
            # the (1 + w) of Gemma's RMSNorm, which get() turns back into w.
            cfg.update(tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                       sliding_window_pattern=6 if window else 1,
                       rope_local_base_freq=_f32(a("rope.freq_base_swa", 10000.0)),
                       final_logit_softcapping=a("final_logit_softcapping"))
            cfg["query_pre_attn_scalar"] = cfg.get("head_dim", 256)
            if self.meta("general.size_label") == "27B":
                cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        pattern = a("attention.sliding_window_pattern")  # per layer, True where sliding
        if self.arch in ("gemma3", "exaone4") and window and pattern is not None:
            cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        if self.arch == "phi3":
            if not window:  # 0: Phi-4, no window
                cfg.pop("sliding_window", None)
            head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
            cfg["partial_rotary_factor"] = a("rope.dimension_count", head_dim) / head_dim
            cfg["original_max_position_embeddings"] = a("rope.scaling.original_context_length",
                                                        cfg["max_position_embeddings"])
            if self._rope_factors["long"] is not None:
                cfg["rope_scaling"] = {"rope_type": "longrope", **{
                    f"{k}_factor": [float(v) for v in np.asarray(
                        dequantize(t.data, t.tensor_type), np.float64).ravel()]
                    for k, t in self._rope_factors.items()}}
                attn = a("rope.scaling.attn_factor")
                if attn is not None:
                    cfg["rope_scaling"]["attention_factor"] = _f32(attn)
        if self.arch == "qwen3moe":  # llama.cpp renormalizes the top-k weights
            cfg.update(num_experts=a("expert_count"), num_experts_per_tok=a("expert_used_count"),
                       moe_intermediate_size=a("expert_feed_forward_length"),
                       norm_topk_prob=True)
        if self.arch in _QWEN35:
            heads = a("ssm.time_step_rank")
            cfg.update(layer_types=["linear_attention" if r else "full_attention"
                                    for r in a("attention.recurrent_layers")],
                       linear_conv_kernel_dim=a("ssm.conv_kernel"),
                       linear_key_head_dim=a("ssm.state_size"),
                       linear_num_key_heads=a("ssm.group_count"), linear_num_value_heads=heads,
                       linear_value_head_dim=a("ssm.inner_size") // heads,
                       # llama.cpp orders v heads tiled over the k heads, not grouped by them
                       linear_value_heads_tiled=True,
                       partial_rotary_factor=a("rope.dimension_count") / cfg["head_dim"])
        if self.arch == "qwen35moe":
            cfg.update(num_experts=a("expert_count"), num_experts_per_tok=a("expert_used_count"),
                       moe_intermediate_size=a("expert_feed_forward_length"),
                       shared_expert_intermediate_size=a("expert_shared_feed_forward_length", 0))
        if self.arch == "smollm3":  # llama.cpp: no rope in every 4th layer
            cfg["no_rope_layers"] = [int((i + 1) % 4 != 0) for i in range(n)]

    def _eos_ids(self):
        """eos plus the end-of-turn tokens llama.cpp also stops at (Llama 3's <|eot_id|>)."""
        ids = [self.meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        ids = list(dict.fromkeys(i for i in ids if i is not None))
        return ids[0] if len(ids) == 1 else (ids or None)

    def _rope_scaling(self, cfg: dict) -> Optional[dict]:
        kind = self.meta(f"{self.arch}.rope.scaling.type")
        factor = self.meta(f"{self.arch}.rope.scaling.factor")
        if self._rope_freqs is not None:
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
            divisors = dequantize(self._rope_freqs.data, self._rope_freqs.tensor_type)
            return llama3_rope_scaling(np.asarray(divisors, np.float64).ravel(), head_dim,
                                       cfg["rope_theta"])
        if kind in (None, "none") or factor in (None, 1.0):
            return None
        # Anything but linear (yarn, longrope) is passed on; the model rejects what it lacks.
        scaling = {"rope_type": kind, "factor": factor}
        orig = self.meta(f"{self.arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = orig
        return scaling

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_info(self) -> dict:
        from cake.text.weights import FLOAT_TYPES, TensorInfo

        return {n: TensorInfo(tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name,
                              int(t.n_bytes), t.tensor_type.name not in FLOAT_TYPES)
                for n, t in self._tensors.items()}

    def files(self) -> list[Path]:
        return [self.path]

    def read_sparsely(self) -> None:
        """From now on only small tensors are read (norms: the matrices come from
        repack_cache): no readahead around them. Else each read a whole readahead window
        of the file when its pages were not cached (8 MiB on the VMs here: ~40% of a 1B
        model's file for its 33 norms)."""
        mapped = getattr(self._reader.data, "_mmap", None)
        if mapped is not None and hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_RANDOM)

    def raw(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray, tuple[int, ...]]:
        """(ggml type, packed data [rows, bytes or values per row], Hugging Face shape).
        Rows are in Hugging Face order: llama's Q/K permutation is undone on the packed rows
        (a quant block never spans two rows)."""
        if name not in self._tensors:
            raise KeyError(f"tensor {name} not in checkpoint {self.path}")
        t = self._tensors[name]
        data, shape = t.data, tuple(int(d) for d in reversed(t.shape))
        n_head = self._permuted_heads(name)
        if n_head:
            data = unpermute_rows(data, n_head)
        return t.tensor_type, data, shape

    def _permuted_heads(self, name: str) -> int:
        if self.arch not in _PERMUTED:  # qwen2/qwen3, gemma3, ... are converted without it
            return 0
        if ".self_attn.q_proj." in name:
            return self.config["num_attention_heads"]
        if ".self_attn.k_proj." in name:
            return self.config["num_key_value_heads"]
        return 0

    def get(self, name: str) -> torch.Tensor:
        qtype, data, shape = self.raw(name)
        # np.array copies: the memory map is read-only and torch wants writable memory.
        values = np.array(dequantize(data, qtype), dtype=np.float32).reshape(shape)
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            values -= 1.0  # the converter stored Gemma's 1 + w; the model adds the 1 itself
        if self.arch in _QWEN35:
            values = _qwen35_values(name, values)
        return torch.from_numpy(values)

    # --- tokenizer ---------------------------------------------------------------------

    def chat_template(self) -> Optional[str]:
        return self.meta("tokenizer.chat_template")

    def special_tokens(self) -> dict:
        tokens = self._reader.fields["tokenizer.ggml.tokens"]
        bos_id = self.meta("tokenizer.ggml.bos_token_id")
        eos_id = self.meta("tokenizer.ggml.eos_token_id")
        return {
            "bos_token": None if bos_id is None else tokens.contents(bos_id),
            "bos_token_id": bos_id,
            "eos_token": None if eos_id is None else tokens.contents(eos_id),
            "eos_token_id": eos_id,
            # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say.
            "add_bos": bool(self.meta("tokenizer.ggml.add_bos_token",
                                      self.meta("tokenizer.ggml.model") == "llama")),
            "add_eos": bool(self.meta("tokenizer.ggml.add_eos_token", False)),
        }

    def tokenizer(self) -> Tokenizer:
        """A `tokenizers.Tokenizer` equivalent to the one the model was converted from.
        encode() adds BOS/EOS when the file says llama.cpp would (add_special_tokens=True)."""
        kind = self.meta("tokenizer.ggml.model")
        tokens = self.meta("tokenizer.ggml.tokens")
        types = self.meta("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
        if kind == "gpt2":
            tok = byte_level_bpe(tokens, self.meta("tokenizer.ggml.merges"),
                                 self.meta("tokenizer.ggml.pre", "default"))
        elif kind == "llama":
            unk = self.meta("tokenizer.ggml.unknown_token_id")
            tok = sentencepiece_bpe(tokens, self.meta("tokenizer.ggml.scores"),
                                    None if unk is None else tokens[unk],
                                    self.meta("tokenizer.ggml.add_space_prefix", True))
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (have gpt2, llama)")
        # Control tokens are matched whole and dropped by skip_special_tokens; user-defined
        # ones (like <think>) are matched whole but are ordinary text.
        special = (TokenType.CONTROL, TokenType.UNKNOWN)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in special])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED])
        sp = self.special_tokens()
        bos = [(sp["bos_token"], sp["bos_token_id"])] if sp["add_bos"] and sp["bos_token"] else []
        eos = [(sp["eos_token"], sp["eos_token_id"])] if sp["add_eos"] and sp["eos_token"] else []
        if bos or eos:
            b, e = [t for t, _ in bos], [t for t, _ in eos]
            tok.post_processor = TemplateProcessing(
                single=b + ["$A"] + e,
                pair=b + ["$A"] + e + [f"{t}:1" for t in b] + ["$B:1"] + [f"{t}:1" for t in e],
                special_tokens=list(dict(bos + eos).items()))
        return tok


def _qwen35_values(name: str, values: np.ndarray) -> np.ndarray:
    """Undo what llama.cpp's converter did to Qwen3.5's tensors: (1 + w) norms (not the
    DeltaNet's gated norm), A as -exp(A_log), the conv kernel without its middle axis."""
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return values - 1.0
    if name.endswith("linear_attn.A_log"):
        return np.log(-values)
    if name.endswith("linear_attn.conv1d.weight"):
        return values[:, None, :]
    return values


def llama3_rope_scaling(divisors: np.ndarray, head_dim: int, theta: float) -> Optional[dict]:
    """Llama 3 rope parameters reproducing llama.cpp's per-frequency divisors (rope_freqs).

    The llama3 rule is: divisor 1 above the high-frequency cutoff, `factor` below the
    low-frequency cutoff, and between them 1/divisor = (1-s)/factor + s with s linear in
    1/wavelength. Scaling original_max_position_embeddings, low and high factors together
    changes nothing, so we fix the context at 8192 (Llama 3's) and solve for the two cutoffs.
    """
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0):
        return None
    if np.allclose(divisors, factor):
        return {"rope_type": "linear", "factor": factor}
    x = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)  # 1 / wavelength
    scaled, plain = np.isclose(divisors, factor), np.isclose(divisors, 1.0)
    mid = ~(scaled | plain)
    s = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
    # s(x) = (x - x_lo) / (x_hi - x_lo): find the cutoffs x_lo (low freq), x_hi (high freq).
    lo_bound = x[scaled].max() if scaled.any() else 0.0
    hi_bound = x[plain].min() if plain.any() else 2 * x.max()
    if mid.sum() >= 2:
        slope, icept = np.polyfit(x[mid], s, 1)
        x_lo, x_hi = -icept / slope, (1 - icept) / slope
    elif mid.sum() == 1:  # any line through the one point that fits between its neighbours
        xm, sm = x[mid][0], s[0]
        width = 0.5 * min((xm - lo_bound) / sm, (hi_bound - xm) / (1 - sm))
        x_lo, x_hi = xm - sm * width, xm + (1 - sm) * width
    else:
        x_lo, x_hi = lo_bound + (hi_bound - lo_bound) / 3, lo_bound + 2 * (hi_bound - lo_bound) / 3
    ctx = 8192
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(x_lo * ctx),
               "high_freq_factor": float(x_hi * ctx), "original_max_position_embeddings": ctx}
    _check_rope(scaling, divisors, head_dim, theta)
    return scaling


def _check_rope(scaling: dict, divisors: np.ndarray, head_dim: int, theta: float) -> None:
    """Refuse rather than serve a model with silently wrong positions."""
    from cake.text.models.llama import rope_inv_freq
    args = SimpleNamespace(head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
    want = theta ** (-np.arange(0, head_dim, 2) / head_dim) / divisors
    if not np.allclose(rope_inv_freq(args).double().numpy(), want, rtol=1e-5, atol=0):
        raise ValueError("GGUF rope_freqs do not follow Llama 3 rope scaling")


# Pre-tokenizer regexes, by tokenizer.ggml.pre, as llama.cpp's llama-vocab.cpp applies them
# (the Hugging Face tokenizer.json of those models says the same).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "stablelm2",
                     "roberta-bpe"], [_GPT2]),
    # StarCoder-style vocabularies (SmolLM too) split every digit off first.
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"], [r"\p{N}", _GPT2]),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "dbrx",
                     "smaug-bpe"], [_LLAMA3]),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], [_QWEN2]),
    "tekken": [_TEKKEN],
}
# These vocabularies look a whole pre-token up before merging (tokenizer.json "ignore_merges").
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1"}


def byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Tokenizer:
    """GPT-2 style byte-level BPE. Normal tokens are stored in the byte alphabet (Ġ for a
    space); added tokens are stored as raw text and are matched as AddedTokens."""
    if pre not in PRE_TOKENIZER_SPLITS:
        log.warning("unknown GGUF pre-tokenizer %r, splitting like GPT-2", pre)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    if pre in ("qwen2", "deepseek-r1-qwen"):
        tok.normalizer = normalizers.NFC()  # as Qwen's own tokenizer.json
    splits = PRE_TOKENIZER_SPLITS.get(pre, [_GPT2])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_bpe(tokens: list[str], scores: list[float], unk: Optional[str],
                      add_space_prefix: bool) -> Tokenizer:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral 7B): llama.cpp merges the adjacent pair
    whose result scores highest, which is BPE with merges ranked by that score; <0x..> tokens
    stand for bytes no piece covers. llama.cpp prefixes a space to every text fragment
    between special tokens, as the normalizer below does to each fragment."""
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges_from_scores(tokens, scores, vocab), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]):
    """Every split of a token into two tokens is a merge, ranked by the token's score (ties as
    transformers breaks them, so both agree)."""
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:]) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(score, left, right) for left, right in local]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in merges]
