// cake web UI: chat (streamed over SSE), cluster view, image and audio tabs.
// Plain browser JavaScript, no build step. Markdown: marked; sanitizing: DOMPurify.
"use strict";

const $ = (sel) => document.querySelector(sel);
const STORE = "cake.chat";
const KEY_STORE = "cake.apiKey";
const CLUSTER_REFRESH_MS = 10000;

// ---------- helpers ----------

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Raw HTML written by the model is shown as text, never interpreted; DOMPurify then
// strips anything dangerous marked itself could emit (javascript: links and the like).
marked.use({ gfm: true, renderer: { html: (token) => escapeHtml(token.text) } });
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
});

function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text));
}

function formatBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function apiHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The server's {"error": "..."} as a readable message; opens the key dialog on 401.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) message = typeof body.error === "string" ? body.error : (body.error.message || JSON.stringify(body.error));
  } catch (_) { /* not JSON */ }
  if (response.status === 401) askForKey();
  return `Error ${response.status}: ${message}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: apiHeaders(options.headers || {}) });
  if (!response.ok) throw new Error(await errorOf(response));
  return response;
}

function showBanner(message) {
  const banner = $("#banner");
  banner.textContent = message || "";
  banner.hidden = !message;
}

// ---------- API key ----------

function askForKey() {
  const dialog = $("#key-dialog");
  if (dialog.open) return;
  $("#key-input").value = localStorage.getItem(KEY_STORE) || "";
  dialog.showModal();
}

$("#key-button").addEventListener("click", askForKey);
$("#key-dialog").addEventListener("close", () => {
  if ($("#key-dialog").returnValue !== "save") return;
  const key = $("#key-input").value.trim();
  if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
  start();
});

// ---------- tabs ----------

function visibleTabs() {
  return [...document.querySelectorAll("#tabs [data-tab]")].filter((b) => !b.hidden).map((b) => b.dataset.tab);
}

function selectTab(name) {
  const tabs = visibleTabs();
  if (!tabs.includes(name)) name = tabs[0];
  for (const button of document.querySelectorAll("#tabs [data-tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const section of document.querySelectorAll("main > .tab")) {
    section.hidden = section.id !== `tab-${name}`;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "cluster") cluster.refresh();
  if (name === "chat") $("#prompt").focus();
}

for (const button of document.querySelectorAll("#tabs [data-tab]")) {
  button.addEventListener("click", () => selectTab(button.dataset.tab));
}

// ---------- chat ----------

// <think>…</think> (or a bare </think> when the template opened it) is the model's reasoning.
function splitThink(text) {
  const open = text.indexOf("<think>");
  const close = text.indexOf("</think>");
  if (open < 0 && close < 0) return { reasoning: null, answer: text, thinking: false };
  if (open >= 0 && (close < 0 || close < open)) {
    return { reasoning: text.slice(open + 7), answer: text.slice(0, open), thinking: true };
  }
  const start = open >= 0 ? open + 7 : 0;
  return {
    reasoning: text.slice(start, close),
    answer: (open >= 0 ? text.slice(0, open) : "") + text.slice(close + 8),
    thinking: false,
  };
}

function loadConversation() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE));
    if (saved && Array.isArray(saved.messages)) return saved;
  } catch (_) { /* start fresh */ }
  return { messages: [], system: "", temperature: 0.7, maxTokens: 1024 };
}

const conversation = loadConversation();
const save = () => localStorage.setItem(STORE, JSON.stringify(conversation));

// One DOM view per message, built once and updated in place while tokens stream in,
// so an expanded reasoning block stays expanded.
class MessageView {
  constructor(message) {
    this.message = message;
    this.el = document.createElement("div");
    this.el.className = `msg ${message.role}`;
    this.el.innerHTML = `<div class="role">${message.role === "user" ? "You" : "Assistant"}</div>
      <details class="reasoning" hidden><summary>Reasoning</summary><div class="md"></div></details>
      <div class="content md"></div><div class="error" hidden></div><div class="stats muted"></div>`;
    this.reasoning = this.el.querySelector(".reasoning");
    this.wasThinking = false;
    this.update();
  }

  update() {
    const m = this.message;
    const content = this.el.querySelector(".content");
    if (m.role === "user") {
      content.textContent = m.content;
    } else {
      const part = splitThink(m.content);
      this.reasoning.hidden = part.reasoning === null;
      if (part.reasoning !== null) {
        this.reasoning.querySelector(".md").innerHTML = renderMarkdown(part.reasoning);
        if (part.thinking && !this.wasThinking) this.reasoning.open = true;
        if (!part.thinking && this.wasThinking) this.reasoning.open = false;
        this.wasThinking = part.thinking;
      }
      content.innerHTML = renderMarkdown(part.answer);
    }
    const error = this.el.querySelector(".error");
    error.hidden = !m.error;
    error.textContent = m.error || "";
    this.el.querySelector(".stats").textContent = statsText(m);
  }
}

function statsText(m) {
  if (!m.stats) return "";
  const parts = [`${m.stats.tokens} tokens`];
  if (m.stats.tokensPerSecond) parts.push(`${m.stats.tokensPerSecond.toFixed(1)} tok/s`);
  if (m.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function renderConversation() {
  const list = $("#messages");
  list.replaceChildren(...conversation.messages.map((m) => new MessageView(m).el));
  list.scrollTop = list.scrollHeight;
  $("#system-prompt").value = conversation.system;
  $("#temperature").value = conversation.temperature;
  $("#max-tokens").value = conversation.maxTokens;
}

// Yields the data of each server-sent event in a fetch body.
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

let generation = null; // the AbortController of the answer being streamed

function setBusy(busy) {
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
}

async function sendMessage() {
  const text = $("#prompt").value.trim();
  if (!text || generation) return;
  $("#prompt").value = "";
  const history = [];
  for (const m of conversation.messages) {
    // An exchange that failed before any text came back is not sent again.
    if (m.role === "assistant" && !m.content) history.pop();
    else history.push({ role: m.role, content: m.content });
  }
  const messages = [
    ...(conversation.system.trim() ? [{ role: "system", content: conversation.system }] : []),
    ...history, { role: "user", content: text },
  ];
  conversation.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "" };
  conversation.messages.push(reply);
  save();
  renderConversation();
  const view = new MessageView(reply);
  $("#messages").lastElementChild.replaceWith(view.el);

  const body = { messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat(conversation.temperature);
  const maxTokens = parseInt(conversation.maxTokens, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;

  generation = new AbortController();
  setBusy(true);
  let chunks = 0, usage = null, firstAt = null, pending = false;
  const measure = () => {
    const tokens = usage ? usage.completion_tokens : chunks;
    const seconds = firstAt === null ? 0 : (performance.now() - firstAt) / 1000;
    // Decode speed: tokens after the first over the time since the first arrived.
    reply.stats = { tokens, tokensPerSecond: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null };
  };
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      measure();
      view.update();
      const list = $("#messages");
      list.scrollTop = list.scrollHeight;
    });
  };
  try {
    const response = await api("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: generation.signal,
    });
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error(typeof event.error === "string" ? event.error : event.error.message);
      if (event.usage) usage = event.usage;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        if (firstAt === null) firstAt = performance.now();
        chunks += 1;
        reply.content += delta.content;
        redraw();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = e.message || String(e);
  } finally {
    generation = null;
    setBusy(false);
    measure();
    if (reply.stats.tokens === 0 && !reply.stopped) delete reply.stats;
    save();
    view.update();
    $("#prompt").focus();
  }
}

$("#composer").addEventListener("submit", (e) => { e.preventDefault(); sendMessage(); });
$("#prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendMessage(); }
});
$("#stop").addEventListener("click", () => generation && generation.abort());
$("#new-chat").addEventListener("click", () => {
  if (generation) generation.abort();
  conversation.messages = [];
  save();
  renderConversation();
});
for (const [id, field] of [["#system-prompt", "system"], ["#temperature", "temperature"], ["#max-tokens", "maxTokens"]]) {
  $(id).addEventListener("input", () => { conversation[field] = $(id).value; save(); });
}

// ---------- cluster ----------

// A node's layers come as "model.layers.0-13,model.layers.20-29" or a list of names.
function layerIndices(layers) {
  const items = Array.isArray(layers) ? layers : String(layers || "").split(",");
  const out = [];
  for (const item of items) {
    const m = String(item).trim().match(/(\d+)(?:-(\d+))?$/);
    if (!m) continue;
    const first = Number(m[1]), last = m[2] === undefined ? first : Number(m[2]);
    for (let i = first; i <= last; i++) out.push(i);
  }
  return out;
}

function rangeText(indices) {
  if (!indices.length) return "none";
  const runs = [];
  let start = indices[0], prev = indices[0];
  for (const i of indices.slice(1).concat([null])) {
    if (i === prev + 1) { prev = i; continue; }
    runs.push(start === prev ? `${start}` : `${start}–${prev}`);
    start = prev = i;
  }
  return `${runs.join(", ")} (${indices.length} layer${indices.length === 1 ? "" : "s"})`;
}

const cluster = {
  open: new Set(), // keys of the <details> the user expanded; kept across refreshes
  timer: null,

  async refresh() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => { if (!$("#tab-cluster").hidden) this.refresh(); }, CLUSTER_REFRESH_MS);
    try {
      const response = await api("api/v1/topology");
      this.render(await response.json());
      $("#cluster-error").hidden = true;
    } catch (e) {
      $("#cluster-error").textContent = e.message;
      $("#cluster-error").hidden = false;
    }
  },

  render(topo) {
    if (!Object.keys(topo.master || {}).length && !(topo.workers || []).length) {
      $("#cluster-summary").innerHTML = `<h2>${escapeHtml(topo.model_id || "No model loaded")}</h2>
        <p class="muted">This model runs whole in the server process; it has no layers to place.</p>`;
      $("#nodes").replaceChildren();
      return;
    }
    const nodes = [{ ...(topo.master || {}), role: "master", key: "master" },
      ...(topo.workers || []).map((w, i) => ({ ...w, role: "worker", key: `worker:${w.name || w.host || w.hostname || i}` }))];
    for (const node of nodes) node.indices = layerIndices(node.layers);
    // Pipeline order: by first layer held; a node holding none keeps its place at the end.
    nodes.sort((a, b) => (a.indices.length ? a.indices[0] : Infinity) - (b.indices.length ? b.indices[0] : Infinity));
    const details = topo.layer_details || {};
    $("#cluster-summary").innerHTML = topo.model_id ? `<h2>${escapeHtml(topo.model_id)}</h2>
      <p class="muted">${escapeHtml(topo.dtype || "")} · ${topo.num_layers ?? "?"} layers ·
      ${formatBytes(topo.memory_bytes)} · ${nodes.length} node${nodes.length === 1 ? "" : "s"}</p>` : "<p>No model loaded.</p>";
    $("#nodes").replaceChildren(...nodes.map((node, position) => this.nodeCard(node, position, details)));
  },

  nodeCard(node, position, details) {
    const card = document.createElement("article");
    card.className = "node";
    card.dataset.node = node.key;
    const total = node.vram_bytes || 0, used = node.memory_used_bytes;
    const percent = total && used != null ? Math.min(100, (100 * used) / total) : 0;
    const status = node.status || "unknown";
    const name = node.role === "master" ? (node.hostname || "master") : (node.name || node.hostname || node.host || "worker");
    card.innerHTML = `
      <header><span class="step">${position + 1}</span><h3>${escapeHtml(name)}</h3>
        <span class="badge">${node.role}</span>
        <span class="status status-${escapeHtml(status)}">${escapeHtml(status)}</span></header>
      <dl>
        <dt>Device</dt><dd>${escapeHtml(node.device || "?")}${node.backend ? ` (${escapeHtml(node.backend)})` : ""}${node.os ? ` · ${escapeHtml(node.os)}` : ""}${node.host ? ` · ${escapeHtml(node.host)}` : ""}</dd>
        <dt>Memory</dt><dd><div class="membar" title="${percent.toFixed(1)}%"><div style="width:${percent}%"></div></div>
          <span class="memtext">${formatBytes(used)} / ${formatBytes(total)}</span></dd>
        <dt>Layers</dt><dd class="layer-range">${rangeText(node.indices)}</dd>
      </dl>`;
    const layers = node.indices.map((i) => `model.layers.${i}`).filter((name) => details[name]);
    if (layers.length) {
      const list = this.details(`${node.key}`, `Tensors of ${layers.length} layer${layers.length === 1 ? "" : "s"}`, "layers");
      for (const layer of layers) {
        const d = details[layer];
        const item = this.details(`${node.key}|${layer}`, `${layer} · ${d.tensors.length} tensors · ${formatBytes(d.total_bytes)}`, "layer");
        item.dataset.layer = layer;
        const rows = d.tensors.map((t) => `<tr><td>${escapeHtml(t.short_name || t.name)}</td><td>${escapeHtml(t.dtype)}</td>
          <td>[${t.shape.map(Number).join(", ")}]</td><td>${formatBytes(t.size_bytes)}</td></tr>`).join("");
        item.insertAdjacentHTML("beforeend", `<table class="tensors"><thead><tr><th>Name</th><th>Dtype</th>
          <th>Shape</th><th>Size</th></tr></thead><tbody>${rows}</tbody></table>`);
        list.append(item);
      }
      card.append(list);
    }
    return card;
  },

  details(key, summary, className) {
    const el = document.createElement("details");
    el.className = className;
    el.innerHTML = `<summary>${escapeHtml(summary)}</summary>`;
    el.open = this.open.has(key);
    el.addEventListener("toggle", () => { if (el.open) this.open.add(key); else this.open.delete(key); });
    return el;
  },
};

// ---------- image ----------

$("#image-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const button = $("#image-generate"), started = performance.now();
  button.disabled = true;
  $("#image-error").hidden = true;
  $("#image-status").textContent = "Generating…";
  try {
    const response = await api("v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: $("#image-prompt").value, response_format: "b64_json" }),
    });
    const url = `data:image/png;base64,${(await response.json()).data[0].b64_json}`;
    $("#image-output").src = url;
    $("#image-download").href = url;
    $("#image-result").hidden = false;
    $("#image-status").textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (err) {
    $("#image-error").textContent = err.message;
    $("#image-error").hidden = false;
    $("#image-status").textContent = "";
  } finally {
    button.disabled = false;
  }
});

// ---------- audio ----------

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

let audioUrl = null;
$("#audio-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const button = $("#audio-generate"), started = performance.now();
  button.disabled = true;
  $("#audio-error").hidden = true;
  $("#audio-status").textContent = "Speaking…";
  try {
    const body = { input: $("#audio-text").value, response_format: "wav" };
    const voice = $("#audio-voice").files[0];
    if (voice) body.voice_data = await fileToBase64(voice);
    const response = await api("v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (audioUrl) URL.revokeObjectURL(audioUrl);
    audioUrl = URL.createObjectURL(await response.blob());
    $("#audio-output").src = audioUrl;
    $("#audio-download").href = audioUrl;
    $("#audio-result").hidden = false;
    $("#audio-status").textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (err) {
    $("#audio-error").textContent = err.message;
    $("#audio-error").hidden = false;
    $("#audio-status").textContent = "";
  } finally {
    button.disabled = false;
  }
});

// ---------- start ----------

const TABS_FOR = { text: ["chat"], image: ["image"], audio: ["audio"] };

async function start() {
  try {
    const info = await (await api("api/v1/info")).json();
    const shown = new Set([...(TABS_FOR[info.model_type] || []), "cluster"]);
    for (const button of document.querySelectorAll("#tabs [data-tab]")) button.hidden = !shown.has(button.dataset.tab);
    $("#model-name").textContent = info.model_id || "no model loaded";
    showBanner("");
    selectTab(location.hash.slice(1));
    await api("v1/models"); // asks for the API key now, not at the first message, if one is needed
  } catch (e) {
    showBanner(e instanceof TypeError ? `Cannot reach the server: ${e.message}` : e.message);
  }
}

renderConversation();
start();
