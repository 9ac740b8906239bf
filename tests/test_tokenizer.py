import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from cake.text.tokenizer import (CHATML_TEMPLATE, IncrementalDetokenizer, StopMatcher,
                                 TemplateError, Tokenizer)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>"]
CORPUS = ["Hello world, the sky is blue because of Rayleigh scattering.",
          "The quick brown fox jumps over the lazy dog.",
          "café naïve 日本語 你好 世界 🙂 👋"] * 10

# Model templates in the styles found on the Hub.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = """{{- bos_token }}
{%- if tools is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\nTools: ' }}
    {%- for t in tools %}
        {{- t | tojson(indent=2) }}
    {%- endfor %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Whitespace handling (trim_blocks/lstrip_blocks), namespace, loop controls, the
# {% generation %} tag, raise_exception, and a kwarg passed through to the template.
STRICT = """{% set ns = namespace(n=0) %}
{% if messages and messages[0]['role'] == 'system' %}
    <<SYS>>{{ messages[0]['content'] }}<</SYS>>
    {% set messages = messages[1:] %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if message['role'] == 'assistant' %}
        {% generation %}[A] {{ message['content'] }}{{ eos_token }}{% endgeneration %}
    {% else %}
        [U] {{ message['content'] }}
    {% endif %}
    {% if ns.n >= 5 %}{% break %}{% endif %}
{% endfor %}
{{ {'n': ns.n, 'note': 'é<b>'} | tojson }}
{% if add_generation_prompt %}[A]{% endif %}
"""


def _train(vocab_size=420):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def bpe():
    return _train()


def _save(folder, tok, config, files=None):
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    for name, data in (files or {}).items():
        (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


CHATS = [
    [{"role": "user", "content": "Hi there 🙂"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "  Rayleigh scattering.  "},
     {"role": "user", "content": "日本語?"}],
]


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3, STRICT], ids=["smollm2", "llama3", "strict"])
def test_chat_template_matches_transformers(tmp_path, bpe, template):
    from transformers import AutoTokenizer

    eos = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    folder = _save(tmp_path / "m", bpe, {"chat_template": template,
                                         "bos_token": "<|begin_of_text|>", "eos_token": eos})
    ours, theirs = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(str(folder))
    tools = [{"type": "function",
              "function": {"name": "météo", "parameters": {"b": 1, "a": "<x>"}}}]
    for chat in CHATS:
        for gen in (True, False):
            want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want
        want = theirs.apply_chat_template(chat, tools=tools, tokenize=False,
                                          add_generation_prompt=True)
        assert ours.apply_chat_template(chat, tools=tools) == want
        want = theirs.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)
        assert ours.encode_chat(chat) == list(want["input_ids"])


def test_special_tokens_in_text_are_recognised(bpe):
    tok = Tokenizer(bpe, None, None, "<|endoftext|>")
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == bpe.token_to_id("<|im_start|>") and ids[-1] == bpe.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "user\nhello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>"
    assert tok.vocab_size == bpe.get_vocab_size()


def test_chatml_fallback_and_stop_ids(bpe):
    tok = Tokenizer(bpe, None, None, "<|endoftext|>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # eos plus the turn end the (fallback) template writes; <|eot_id|> is unused by it
    assert tok.stop_ids == {bpe.token_to_id("<|endoftext|>"), bpe.token_to_id("<|im_end|>")}
    llama = Tokenizer(bpe, LLAMA3, "<|begin_of_text|>", "<|endoftext|>", extra_stop_ids=[7])
    assert llama.stop_ids == {bpe.token_to_id("<|endoftext|>"), bpe.token_to_id("<|eot_id|>"), 7}


def test_template_errors(bpe):
    tok = Tokenizer(bpe, STRICT, None, "<|endoftext|>")
    with pytest.raises(TemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"},
                                 {"role": "user", "content": "b"}])
    bad = Tokenizer(bpe, "{{ messages[0]['content'] + 1 }}", None, None)
    with pytest.raises(TemplateError):
        bad.apply_chat_template([{"role": "user", "content": "a"}])
    with pytest.raises(TemplateError, match="does not compile"):
        Tokenizer(bpe, "{% for m in messages %}", None, None)
    # the sandbox refuses to reach Python internals
    evil = Tokenizer(bpe, "{{ messages.__class__.__mro__ }}", None, None)
    with pytest.raises(TemplateError):
        evil.apply_chat_template([{"role": "user", "content": "a"}])


def test_none_values_dropped_and_missing_bos_renders_empty(bpe):
    tok = Tokenizer(bpe, "{{ bos_token }}{% for m in messages %}{{ m.role }}"
                         "{% if m.tool_calls is defined %}!{% endif %}{% endfor %}", None, None)
    assert tok.apply_chat_template([{"role": "user", "content": "x", "tool_calls": None}]) == "user"


def test_from_dir_variants(tmp_path, bpe):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    a = Tokenizer.from_dir(_save(tmp_path / "a", bpe, {
        "chat_template": named, "bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
        "eos_token": "<|im_end|>", "add_bos_token": True},
        {"generation_config.json": {"eos_token_id": [3, 4]}, "config.json": {"eos_token_id": 9}}))
    assert a.chat_template == "DEFAULT" and a.bos_token == "<|begin_of_text|>"
    assert a.stop_ids == {bpe.token_to_id("<|im_end|>"), 3, 4, 9}
    bos = bpe.token_to_id("<|begin_of_text|>")
    assert a.encode_chat([{"role": "user", "content": "x"}])[0] == bos
    assert a.encode("hi", add_special_tokens=True)[0] == bos and a.encode("hi")[0] != bos

    b = Tokenizer.from_dir(_save(tmp_path / "b", bpe, {"chat_template": "OLD"},
                                 {"chat_template.jinja": "{{ bos_token }}NEW"}))
    assert b.apply_chat_template([]) == "NEW"  # no bos_token configured: renders empty
    c = Tokenizer.from_dir(_save(tmp_path / "c", bpe, {"eos_token": "<|endoftext|>"}))
    assert c.chat_template is None and c.apply_chat_template([]) == "<|im_start|>assistant\n"


def test_bos_not_doubled_when_template_writes_it(bpe):
    tok = Tokenizer(bpe, LLAMA3, "<|begin_of_text|>", "<|endoftext|>", add_bos=True)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    bos = bpe.token_to_id("<|begin_of_text|>")
    assert ids[0] == bos and ids[1] != bos


# --- incremental detokenizer -------------------------------------------------------------

STREAM_TEXTS = ["Hello world, the sky is blue.", "  leading spaces\tand\nnewlines  ",
                "日本語 你好世界 🙂👋 café naïve", "mixed 🙂x日本z ünïcödé 😀 end"]


def _stream(tok, ids):
    detok = IncrementalDetokenizer(tok)
    chunks = [detok.add(i) for i in ids]
    return chunks, detok.flush()


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_detokenizer_byte_level(bpe, text):
    tok = Tokenizer(bpe, None, None, "<|endoftext|>")
    ids = tok.encode(text + "<|im_end|>")
    # the corpus is tiny, so non-ASCII characters are split over several byte tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()
    chunks, rest = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text and rest == ""
    assert not any("\ufffd" in c for c in chunks)


def _llama_like():
    # SentencePiece style: "▁" marks spaces, unknown characters fall back to <0xNN> bytes,
    # and the decoder strips the first leading space.
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    words = ["▁Hello", "▁world", "▁", "▁the", "▁sky", ",", ".", *"Helowrdthsky"]
    pieces += [(p, -1.0) for p in words]
    tok = HFTokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(tok, None, "<s>", "</s>")


def test_detokenizer_keeps_sentencepiece_spaces():
    tok = _llama_like()
    ids = tok.encode("Hello world, the sky 日本 🙂 yes")
    assert tok.tok.id_to_token(ids[1]) == "▁world"
    chunks, rest = _stream(tok, ids)
    assert chunks[:2] == ["Hello", " world"]  # one token at a time would give "world"
    assert "".join(chunks) == tok.decode(ids) == "Hello world, the sky 日本 🙂 yes" and rest == ""
    assert not any("\ufffd" in c for c in chunks)
    # a special token first: the first word still loses its leading space, as decode does
    ids = [tok.tok.token_to_id("<s>")] + ids + [tok.tok.token_to_id("</s>")]
    assert "".join(_stream(tok, ids)[0]) == tok.decode(ids)


def test_detokenizer_flushes_unfinished_character(bpe):
    tok = Tokenizer(bpe, None, None, None)
    ids = tok.encode("ok 🚀")
    assert "\ufffd" in tok.decode(ids[-1:])  # the emoji is several byte tokens
    ids = ids[:-1]  # generation cut off inside the emoji
    chunks, rest = _stream(tok, ids)
    assert "".join(chunks).startswith("ok") and rest.endswith("\ufffd")
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) + rest == tok.decode(ids)


# --- stop strings ------------------------------------------------------------------------

def _feed_all(stops, chunks):
    m, out = StopMatcher(stops), []
    for c in chunks:
        emit, stopped = m.feed(c)
        out.append(emit)
        if stopped:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def test_stop_spanning_chunks():
    m = StopMatcher(["</answer>"])
    assert m.feed("The answer is 42</an") == ("The answer is 42", False)
    assert m.feed("swer> trailing") == ("", True)
    assert m.feed("more") == ("", True)


def test_stop_holds_only_possible_prefix():
    m = StopMatcher(["STOP"])
    assert m.feed("abcS") == ("abc", False)
    assert m.feed("Tx") == ("STx", False)  # "STx" can no longer become "STOP"
    assert m.feed("yz") == ("yz", False)
    assert m.feed("ST") == ("", False)
    assert m.flush() == "ST"


def test_stop_at_start_and_overlapping_prefixes():
    assert _feed_all(["Hello"], ["Hel", "lo world"]) == ("", True)
    # "aab" overlaps its own prefix: after "aa" a failed "a" keeps the last "aa" pending
    assert _feed_all(["aab"], ["a", "a", "a", "b", "c"]) == ("a", True)
    assert _feed_all(["ab", "abcd"], ["xab", "cd"]) == ("x", True)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_stop_result_does_not_depend_on_chunking(size):
    text = "one two <end> three <stop> four"
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    assert _feed_all(["<stop>", "two <e", "<end>"], chunks) == ("one ", True)
    assert _feed_all(["xyz", "y"], [text + "xyz"]) == (text + "x", True)
    assert _feed_all(["nope"], chunks) == (text, False)
    assert _feed_all([], chunks) == (text, False)
