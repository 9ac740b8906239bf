"""Tool calls: the tools into the prompt, the model's call syntax out of its text.

Each family writes calls its own way; the chat template tells which one a checkpoint uses:
  hermes   (Qwen2/2.5/3, Hermes)  <tool_call>{"name": ..., "arguments": {...}}</tool_call>
  mistral                          [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
                                   (v11 tokenizers: [TOOL_CALLS]name[ARGS]{...} per call)
  llama3   (Llama 3.1-3.3)         {"name": ..., "parameters": {...}}  (after <|python_tag|>)
  json     (any other template)    {"name": ..., "arguments": {...}} or a list of them
Parsing tries the family's syntax, then bare JSON (what small models write). Answers of the
families whose marker is a special token keep special tokens in their text. Forced calls
(tool_choice "required" or a named function) are the family's syntax as a grammar, so any
model emits a valid call.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Optional

from cake.text import grammar

MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}
# Families whose marker is a special token: their answers are decoded with special tokens.
SPECIAL_MARKERS = ("mistral", "llama3")
ARGUMENTS_KEY = {"llama3": "parameters"}  # the others say "arguments"


def family(chat_template: Optional[str]) -> str:
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("ipython" in t and "parameters" in t):
        return "llama3"
    return "json"


def template_knows_tools(chat_template: Optional[str]) -> bool:
    return bool(chat_template) and "tools" in chat_template


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- into the prompt ------------------------------------------------------------------------

def template_messages(messages: list[dict], knows_tools: bool) -> list[dict]:
    """OpenAI history -> what templates read. Templates that know tools take arguments as a
    dict (as transformers documents); the others get calls and results as plain text."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls and knows_tools:
            m["tool_calls"] = [{"type": "function", "id": c["id"], "function": {
                "name": c["function"]["name"],
                "arguments": loads_or_text(c["function"]["arguments"])}} for c in calls]
        elif calls:
            text = "\n".join(json.dumps({"name": c["function"]["name"], "arguments":
                                         loads_or_text(c["function"]["arguments"])})
                             for c in calls)
            m["content"] = ((m.get("content") or "") + "\n" + text).strip()
        if m["role"] == "tool" and not knows_tools:
            m.pop("tool_call_id", None)
        out.append(m)
    return out


def system_prompt(tools: list[dict]) -> str:
    """For templates with no tool support: the tools and how to call them, in words."""
    specs = "\n".join(json.dumps(t["function"]) for t in tools)
    return ("You can call these functions:\n" + specs + "\nTo call one, answer with only a "
            'JSON object: {"name": <function name>, "arguments": <arguments object>}.')


def add_system_prompt(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=messages[0].get("content", "") + "\n\n" + text)
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def loads_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


# -- forcing a call ---------------------------------------------------------------------------

def call_schema(tool: dict, fam: str) -> dict:
    f = tool["function"]
    params = f.get("parameters") or {"type": "object", "properties": {}}
    key = ARGUMENTS_KEY.get(fam, "arguments")
    return {"type": "object", "properties": {"name": {"const": f["name"]}, key: params},
            "required": ["name", key], "additionalProperties": False}


def forced_grammar(fam: str, tools: list[dict], parallel: bool, marker_token: Optional[int]):
    """An llguidance grammar for one call (or, with parallel, one or more) of these tools.
    marker_token: the family marker's id when the vocabulary has it as one special token."""
    one = {"anyOf": [call_schema(t, fam) for t in tools]}
    if fam == "hermes":
        call = '"<tool_call>\\n" ' + grammar.lark_json(one) + ' "\\n</tool_call>"'
        more = ' ("\\n" call)*' if parallel else ""
        lark = f"start: call{more}\ncall: {call}\n"
    elif fam == "mistral":
        marker = f"<[{marker_token}]>" if marker_token is not None else '"[TOOL_CALLS]"'
        calls = {"type": "array", "items": one, "minItems": 1, **({} if parallel else
                                                                  {"maxItems": 1})}
        lark = f"start: {marker} {grammar.lark_json(calls)}\n"
    elif parallel and fam == "json":
        lark = "start: " + grammar.lark_json({"type": "array", "items": one, "minItems": 1})
    else:
        lark = "start: " + grammar.lark_json(one)
    return grammar.lark_grammar(lark)


# -- out of the text ----------------------------------------------------------------------

@dataclass
class Call:
    name: str
    arguments: str  # JSON text

    def wire(self, id: str, index: Optional[int] = None) -> dict:
        out = {"id": id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _as_calls(value, names: set[str]) -> Optional[list[Call]]:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = loads_or_text(args)
        if not isinstance(args, dict):
            return None
        calls.append(Call(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


def _json_values(text: str) -> list:
    """Consecutive JSON values in text (separated by whitespace, ';' or ','), or [] when
    anything else is there."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return []
        values.append(value)


FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
# Mistral's newer tokenizers (v11+): [TOOL_CALLS]name[ARGS]{...}, once per call
MISTRAL_NAMED = re.compile(r"\s*(?:\[TOOL_CALLS\])?\s*([A-Za-z0-9_.\-]+)\s*(?:\[ARGS\])?\s*(?=\{)")


def _mistral_named(text: str, names: set[str]) -> Optional[list[Call]]:
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(text.rstrip()):
        m = MISTRAL_NAMED.match(text, i)
        if not m or m.group(1) not in names:
            return None
        try:
            args, i = decoder.raw_decode(text, m.end())
        except ValueError:
            return None
        if not isinstance(args, dict):
            return None
        calls.append(Call(m.group(1), json.dumps(args, ensure_ascii=False)))
    return calls or None


def parse(text: str, fam: str, names: set[str]) -> tuple[Optional[str], list[Call]]:
    """(content, calls) of a finished answer; calls only to the named tools."""
    if fam == "hermes" and "<tool_call>" in text:
        calls = []
        for body in HERMES.findall(text):
            found = _as_calls(_json_values(body), names) if body else None
            if not found:
                break
            calls += found
        else:
            content = text[:text.index("<tool_call>")].strip()
            return content or None, calls
    if fam == "mistral" and (calls := _mistral_named(text, names)):
        return None, calls
    body = text.strip()
    for marker in MARKERS.values():
        if body.startswith(marker):
            body = body[len(marker):].strip()
    if m := FENCE.match(body):
        body = m.group(1)
    values = _json_values(body)
    calls = [c for v in values for c in (_as_calls(v, names) or [None])]
    if values and all(calls):
        return None, calls
    return text, []


# -- streaming ------------------------------------------------------------------------------

CALL_START = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"'
                        r'\s*:\s*(?=\{)')


def _object_end(text: str, start: int) -> Optional[int]:
    """Where the JSON object starting at text[start] ends (exclusive), None if not yet."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class StreamParser:
    """Turns streamed text into content deltas and OpenAI tool_calls deltas: a call's id and
    name once its name is complete, then its arguments as the model writes them.

    Text that starts like a call (a marker, a JSON object or list) is held back until it is
    one, or plainly is not; an answer that ends without a valid call is sent as content."""

    UNDECIDED_CHARS = 80  # JSON that names no function this far in is not a call

    def __init__(self, fam: str, names: set[str], forced: bool, parallel: bool = True):
        self.fam, self.names, self.parallel = fam, names, parallel
        self.text = ""
        self.content_sent = 0  # characters of text sent as content
        self.state = "calls" if forced else "content"  # or "maybe": held, undecided
        self.hold_from = 0  # where the held text starts
        self.sent: list[list] = []  # per call: [id, name, argument characters sent]

    def _looks_like_call(self, rest: str) -> Optional[bool]:
        """True: a call starts here; None: cannot tell yet; False: it is text."""
        rest = rest.lstrip()
        if not rest:
            return None
        for marker in MARKERS.values():
            if rest.startswith(marker):
                return True
            if marker.startswith(rest):
                return None
        if rest[0] in "{[" or rest.startswith("```") or "```".startswith(rest):
            if CALL_START.search(rest):
                return True
            return None if len(rest) < self.UNDECIDED_CHARS else False
        return False

    def feed(self, text: str) -> list[dict]:
        self.text += text
        deltas = []
        if self.state == "maybe":
            verdict = self._looks_like_call(self.text[self.hold_from:])
            if verdict is not None:
                self.state = "calls" if verdict else "content"
        elif self.state == "content" and self.content_sent == 0:
            if self._looks_like_call(self.text) is not False:
                self.state = "maybe"
        if self.state == "content":
            marker = MARKERS.get(self.fam)
            at = self.text.find(marker, self.content_sent) if marker else -1
            if at >= 0:
                self.state, self.hold_from = "calls", at
                upto = at
            else:  # keep back a tail that may be the start of the marker
                keep = next((n for n in range(len(marker or ""), 0, -1)
                             if self.text.endswith(marker[:n])), 0) if marker else 0
                upto = len(self.text) - keep
            if upto > self.content_sent:
                deltas.append({"content": self.text[self.content_sent:upto]})
                self.content_sent = upto
        if self.state == "calls":
            deltas += self._call_deltas()
        return deltas

    def _call_deltas(self) -> list[dict]:
        out = []
        for i, m in enumerate(CALL_START.finditer(self.text, self.hold_from)):
            name = json.loads(f'"{m.group(1)}"')
            if name not in self.names or (i and not self.parallel):
                break
            if i == len(self.sent):
                self.sent.append([call_id(), name, 0])
                out.append({"tool_calls": [{"index": i, "id": self.sent[i][0], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            end = _object_end(self.text, m.end())
            args = self.text[m.end():end if end is not None else len(self.text)]
            if len(args) > self.sent[i][2]:
                out.append({"tool_calls": [{"index": i, "function": {
                    "arguments": args[self.sent[i][2]:]}}]})
                self.sent[i][2] = len(args)
            if end is None:
                break
        return out

    def finish(self) -> tuple[list[dict], bool]:
        """The last deltas, and whether the answer was tool calls."""
        content, calls = parse(self.text, self.fam, self.names)
        calls = calls if self.parallel else calls[:1]
        deltas = []
        if not calls:  # what was held back was text after all
            if len(self.text) > self.content_sent:
                deltas.append({"content": self.text[self.content_sent:]})
            return deltas, False
        starts = list(CALL_START.finditer(self.text, self.hold_from))
        for i, call in enumerate(calls):
            if i >= len(self.sent):  # a call the stream could not follow: sent whole
                self.sent.append([call_id(), call.name, len(call.arguments)])
                deltas.append({"tool_calls": [call.wire(self.sent[i][0], i)]})
                continue
            args = self.text[starts[i].end():starts[i].end() + self.sent[i][2]]
            if loads_or_text(args) != json.loads(call.arguments):
                raise ValueError(f"streamed arguments of call {i} do not parse as sent")
        return deltas, True
