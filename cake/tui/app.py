"""`cake chat`: a terminal chat (textual). Chat and Cluster tabs, Tab switches; Enter sends,
Shift+Enter (or Ctrl+J) adds a line; Esc or Ctrl+C quits. Answers stream in with their
token count and speed; a model's <think> reasoning is shown dimmed above the answer."""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import Optional

from rich.text import Text
from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Header, Markdown, Static, TabbedContent, TabPane, TextArea, Tree

from cake.tui.backends import BackendError

CLUSTER_REFRESH_S = 10
REDRAW_S = 0.05  # re-render a streaming answer at most this often


def split_think(text: str) -> tuple[Optional[str], str, bool]:
    """(reasoning, answer, still thinking) from a reply that may hold <think>…</think>;
    a bare </think> means the chat template opened the block."""
    start, end = text.find("<think>"), text.find("</think>")
    if start < 0 and end < 0:
        return None, text, False
    if start >= 0 and (end < 0 or end < start):
        return text[start + 7:], text[:start], True
    begin = start + 7 if start >= 0 else 0
    return text[begin:end], (text[:start] if start >= 0 else "") + text[end + 8:], False


def human_bytes(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def layer_indices(layers) -> list[int]:
    """'model.layers.0-13,model.layers.20' or a list of names → [0..13, 20]."""
    items = layers if isinstance(layers, list) else str(layers or "").split(",")
    out = []
    for item in items:
        tail = str(item).strip().rsplit(".", 1)[-1]
        first, _, last = tail.partition("-")
        if first.isdigit():
            out.extend(range(int(first), int(last if last.isdigit() else first) + 1))
    return out


class PromptArea(TextArea):
    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j", "alt+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class ChatMessage(Vertical):
    """One turn. An assistant turn fills in as it streams."""

    def __init__(self, role: str, text: str = ""):
        super().__init__(classes=f"message {role}")
        self.role, self.text = role, text

    def compose(self) -> ComposeResult:
        yield Static("You" if self.role == "user" else "Assistant", classes="role")
        if self.role == "user":
            yield Static(Text(self.text), classes="body")
        else:
            yield Static("", classes="reasoning")
            yield Markdown("", classes="body")
            yield Static("", classes="error")
            yield Static("", classes="stats")

    async def show(self, text: str) -> None:
        self.text = text
        reasoning, answer, thinking = split_think(text)
        box = self.query_one(".reasoning", Static)
        box.display = reasoning is not None
        if reasoning is not None:
            box.update(Text(("thinking… " if thinking else "reasoning: ") + reasoning.strip()))
        await self.query_one(".body", Markdown).update(answer)

    def show_error(self, message: str) -> None:
        error = self.query_one(".error", Static)
        error.display = True
        error.update(Text(message))

    def show_stats(self, stats: str) -> None:
        self.query_one(".stats", Static).update(stats)


class ChatApp(App):
    TITLE = "cake"
    CSS = """
    #messages { height: 1fr; padding: 0 1; }
    .message { height: auto; margin: 0 0 1 0; }
    .message .role { text-style: bold; color: $accent; }
    .message.user .role { color: $secondary; }
    .message .reasoning { color: $text-muted; text-style: dim italic; display: none; }
    .message .error { color: $error; display: none; }
    .message .stats { color: $text-muted; text-style: dim; }
    .message Markdown { margin: 0; padding: 0; }
    #prompt { height: 5; }
    #status { height: 1; color: $text-muted; padding: 0 1; }
    #cluster-tree { height: 1fr; }
    """
    BINDINGS = [
        Binding("tab", "switch_tab", "Chat / Cluster", priority=True),
        Binding("escape", "quit", "Quit", priority=True),
        Binding("ctrl+c", "quit", "Quit", priority=True, show=False),
    ]

    def __init__(self, backend, system: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.history: list[dict] = [{"role": "system", "content": system}] if system else []
        self.generating = False
        self.expanded: set[str] = set()  # cluster tree nodes the user opened

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="chat"):
            with TabPane("Chat", id="chat"):
                yield VerticalScroll(id="messages")
                yield PromptArea(id="prompt", tab_behavior="focus")
                yield Static("", id="status")
            with TabPane("Cluster", id="cluster"):
                yield Tree("cluster", id="cluster-tree")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.backend.name
        self.set_status("Enter sends · Shift+Enter new line · Tab switches · Esc quits")
        self.query_one("#prompt").focus()
        self.set_interval(CLUSTER_REFRESH_S, self.refresh_cluster_if_shown)

    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def action_switch_tab(self) -> None:
        tabs = self.query_one(TabbedContent)
        tabs.active = "cluster" if tabs.active == "chat" else "chat"
        if tabs.active == "cluster":
            self.query_one("#cluster-tree").focus()  # focus left in the hidden pane would
            self.refresh_cluster()                   # bring it back
        else:
            self.query_one("#prompt").focus()

    async def action_quit(self) -> None:
        self.workers.cancel_all()
        self.exit()

    # ---- chat ----

    async def on_prompt_area_submitted(self, message: PromptArea.Submitted) -> None:
        text = message.text.strip()
        if not text or self.generating:
            return
        self.generating = True  # until the answer worker is done with it
        self.query_one("#prompt", PromptArea).clear()
        self.history.append({"role": "user", "content": text})
        messages = self.query_one("#messages", VerticalScroll)
        await messages.mount(ChatMessage("user", text))
        reply = ChatMessage("assistant")
        await messages.mount(reply)
        messages.scroll_end(animate=False)
        self.answer(reply)

    @work(exclusive=True, group="chat")
    async def answer(self, reply: ChatMessage) -> None:
        self.set_status("generating…")
        text, tokens, first, drawn = "", 0, None, 0.0
        messages = self.query_one("#messages", VerticalScroll)
        try:
            async with aclosing(self.backend.stream(list(self.history))) as pieces:
              async for piece in pieces:
                tokens = piece.tokens if piece.tokens is not None else tokens
                if piece.text:
                    first = first or time.monotonic()
                    text += piece.text
                if time.monotonic() - drawn > REDRAW_S:
                    await reply.show(text)
                    reply.show_stats(stats(tokens, first))
                    messages.scroll_end(animate=False)
                    drawn = time.monotonic()
        except BackendError as e:
            reply.show_error(str(e))
            self.set_status("error")
        except asyncio.CancelledError:  # quitting: the backend stream cancels the generation
            self.generating = False
            raise
        else:
            self.set_status("ready")
        await reply.show(text)
        reply.show_stats(stats(tokens, first))
        messages.scroll_end(animate=False)
        if text:
            self.history.append({"role": "assistant", "content": text})
        elif self.history and self.history[-1]["role"] == "user":
            self.history.pop()  # nothing came back: let the user retry cleanly
        self.generating = False

    # ---- cluster ----

    def refresh_cluster_if_shown(self) -> None:
        if self.query_one(TabbedContent).active == "cluster":
            self.refresh_cluster()

    @work(exclusive=True, group="cluster")
    async def refresh_cluster(self) -> None:
        tree = self.query_one("#cluster-tree", Tree)
        try:
            topology = await self.backend.topology()
        except BackendError as e:
            tree.reset(Text(str(e), style="red"))
            return
        self.expanded = {key for key, node in self.tree_nodes(tree.root) if node.is_expanded}
        render_topology(tree, topology)
        for key, node in self.tree_nodes(tree.root):
            if key in self.expanded:
                node.expand()
        tree.root.expand()

    @staticmethod
    def tree_nodes(root):
        stack = list(root.children)
        while stack:
            node = stack.pop()
            if node.data:
                yield node.data, node
            stack.extend(node.children)


def stats(tokens: int, first: Optional[float]) -> str:
    if not tokens:
        return ""
    seconds = time.monotonic() - first if first else 0
    rate = f" · {(tokens - 1) / seconds:.1f} tok/s" if tokens > 1 and seconds > 0 else ""
    return f"{tokens} tokens{rate}"


def render_topology(tree: Tree, topology: dict) -> None:
    """The nodes in pipeline order, each with its layers and their tensors."""
    model = topology.get("model_id") or "no model"
    tree.reset(Text(f"{model} · {topology.get('dtype', '?')} · {topology.get('num_layers', '?')} "
               f"layers · {human_bytes(topology.get('memory_bytes'))}"))
    nodes = [dict(topology.get("master") or {}, role="master")]
    nodes += [dict(w, role="worker") for w in topology.get("workers") or []]
    for node in nodes:
        node["indices"] = layer_indices(node.get("layers"))
    nodes.sort(key=lambda n: n["indices"][0] if n["indices"] else float("inf"))
    details = topology.get("layer_details") or {}
    for step, node in enumerate(nodes, 1):
        name = node.get("hostname") if node["role"] == "master" else \
            node.get("name") or node.get("hostname") or node.get("host")
        idx = node["indices"]
        layers = f"layers {idx[0]}–{idx[-1]} ({len(idx)})" if idx else "no layers"
        used, total = node.get("memory_used_bytes"), node.get("vram_bytes")
        filled = round(10 * used / total) if used and total else 0
        label = (f"{step}. {name or node['role']} [{node['role']}] {node.get('device', '?')} · "
                 f"{'█' * filled}{'░' * (10 - filled)} {human_bytes(used)} / "
                 f"{human_bytes(total)} · {layers} · {node.get('status', 'unknown')}")
        branch = tree.root.add(Text(label), data=f"node:{name}:{step}")
        for i in idx:
            layer = details.get(f"model.layers.{i}")
            if not layer:
                continue
            item = branch.add(Text(f"model.layers.{i} · {len(layer['tensors'])} tensors · "
                                   f"{human_bytes(layer['total_bytes'])}"), data=f"layer:{i}")
            for t in layer["tensors"]:
                item.add_leaf(Text(f"{t.get('short_name') or t['name']}  {t['dtype']}  "
                                   f"{list(t['shape'])}  {human_bytes(t['size_bytes'])}"))
