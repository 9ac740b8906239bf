"""Tokenizer, chat template and streaming detokenization.

The chat template is rendered the way `transformers` renders it (same Jinja environment,
globals and `tojson`), so a prompt is token for token what the model saw in training.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Iterable, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
import tokenizers.decoders
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' old default template, used when a model ships none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Special tokens that end a turn. They stop generation when the template writes them, even if
# the checkpoint's eos_token is another token (Llama 3: eos <|end_of_text|>, turns end <|eot_id|>).
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                   "<|endoftext|>", "<|end_of_text|>", "<|return|>")


class TemplateError(ValueError):
    """The chat template could not be compiled or refused the conversation."""


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    # transformers; rendering only needs it to parse and pass its body through.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers: Jinja's own tojson sorts keys and HTML-escapes, which changes prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template does not compile: {e}") from e


def _token_content(value) -> Optional[str]:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, chat_template: Optional[str],
                 bos_token: Optional[str], eos_token: Optional[str], add_bos: bool = False,
                 extra_stop_ids: Iterable[int] = ()):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self._template = compile_template(chat_template or CHATML_TEMPLATE)

        self.stop_ids: set[int] = set(extra_stop_ids)
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        template_text = chat_template or CHATML_TEMPLATE
        for t in TURN_END_TOKENS:
            if t in specials and t in template_text:
                self.stop_ids.add(specials[t])

    @classmethod
    def from_dir(cls, folder) -> "Tokenizer":
        """Load a Hugging Face tokenizer folder (tokenizer.json and its side files)."""
        folder = Path(folder)
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (folder / "chat_template.jinja").is_file():  # newer repos keep it in its own file
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is None:
            template = _read_json(folder / "chat_template.json").get("chat_template")

        bos = _token_content(cfg.get("bos_token", special_map.get("bos_token")))
        eos = _token_content(cfg.get("eos_token", special_map.get("eos_token")))

        stop_ids: set[int] = set()
        config = _read_json(folder / "config.json")
        for c in (_read_json(folder / "generation_config.json"), config,
                  config.get("text_config") or {}):
            stop_ids.update(_ids(c.get("eos_token_id")))
        return cls(tok, template, bos, eos, add_bos=bool(cfg.get("add_bos_token", False)),
                   extra_stop_ids=stop_ids)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_id
        if add_special_tokens and self.add_bos and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (what logprobs report), whatever the tokenizer's
        encoding of them: GPT-2 byte-level characters, SentencePiece's ▁ and <0xNN>."""
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            decoder = _byte_decoder()
            if all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def _byte_level(self) -> bool:
        return isinstance(self.tok.decoder, tokenizers.decoders.ByteLevel)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render messages to prompt text; kwargs reach the template (tools, enable_thinking)."""
        # transformers drops None values: OpenAI clients send content=None, tool_calls=None.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None}
        # Only tokens that exist, as transformers' special_tokens_map: None would render "None".
        context.update({k: v for k, v in (("bos_token", self.bos_token),
                                           ("eos_token", self.eos_token)) if v is not None})
        context.update(kwargs)
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template rejected the messages: {e}") from e
        except (TypeError, KeyError, IndexError, AttributeError) as e:
            # e.g. a template that concatenates content it expects to be a string
            raise TemplateError(f"chat template failed on these messages: {e!r}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None and not text.startswith(self.bos_token):
            ids.insert(0, self.bos_id)
        return ids


class IncrementalDetokenizer:
    """Turns a stream of token ids into text chunks that are safe to send.

    Each step decodes a short window of recent tokens and emits only what the newest token
    added to it (vLLM/TGI's prefix_offset/read_offset method): decoding tokens one at a time
    would drop SentencePiece's leading spaces and split multi-byte characters.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Optional[Iterable[int]] = None,
                 skip_special_tokens: bool = True):
        # prompt_ids is accepted but not decoded as context: with SentencePiece it would put a
        # leading space on the first word, and the output must equal decode(generated ids).
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens  # False: markers such as [TOOL_CALLS] stay
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context only, already emitted
        self.read_offset = 0  # everything before this has been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        # A trailing U+FFFD is a character whose bytes have not all arrived yet.
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def flush(self) -> str:
        """Text still held at the end: an unfinished character becomes U+FFFD, as in decode."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back only a possible stop prefix."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self.held + text
        # The stop that completes first wins, as if text arrived one character at a time, so
        # the result does not depend on how the text was chunked.
        found = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            _, start = min(found)
            self.held, self.stopped = "", True
            return buf[:start], True
        keep = self._partial_len(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _partial_len(self, buf: str) -> int:
        # Longest tail of buf that is a proper prefix of some stop string.
        longest = max((len(s) for s in self.stops), default=1)
        for n in range(min(len(buf), longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
