// The chat page: streams answers from /v1/chat/completions and keeps the conversation in memory.
// Model output is always escaped before the few Markdown tags we add, so it can never inject HTML.
// When the conversation outgrows the model's context window, the oldest turns are dropped (and the
// page says so) rather than failing every message from then on.
"use strict";

const KEY_STORAGE = "minicpm-api-key";
const $ = (id) => document.getElementById(id);
// messages: the conversation sent with each question, oldest first, as {role, content, el} (el: its
// bubble). chat: bumped by New chat, so an answer still finishing lands in no later conversation.
const state = { messages: [], controller: null, config: null, chat: 0 };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function renderInline(escaped) {
  return escaped
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
}

function renderBlocks(text) {
  const out = [];
  let list = null;
  const closeList = () => { if (list) { out.push(`</${list}>`); list = null; } };
  for (const paragraph of text.split(/\n{2,}/)) {
    const lines = paragraph.split("\n");
    const plain = [];
    const flush = () => { if (plain.length) { closeList(); out.push(`<p>${plain.join("<br>")}</p>`); plain.length = 0; } };
    for (const raw of lines) {
      const line = renderInline(escapeHtml(raw));
      const heading = raw.match(/^(#{1,4})\s+/);
      const bullet = raw.match(/^\s*[-*]\s+/);
      const numbered = raw.match(/^\s*\d+[.)]\s+/);
      if (heading) { flush(); closeList(); out.push(`<h4>${renderInline(escapeHtml(raw.slice(heading[0].length)))}</h4>`); }
      else if (bullet || numbered) {
        flush();
        const kind = bullet ? "ul" : "ol";
        if (list !== kind) { closeList(); out.push(`<${kind}>`); list = kind; }
        out.push(`<li>${renderInline(escapeHtml(raw.slice((bullet || numbered)[0].length)))}</li>`);
      } else { plain.push(line); }
    }
    flush();
    closeList();
  }
  return out.join("");
}

function renderMarkdown(source) {
  // Fenced code blocks alternate with prose; an unclosed fence (mid-stream) is still code.
  return source.split("```").map((part, i) => {
    if (i % 2 === 0) return renderBlocks(part);
    const newline = part.indexOf("\n");
    const code = newline >= 0 ? part.slice(newline + 1) : "";
    return `<pre><code>${escapeHtml(code.replace(/\n$/, ""))}</code></pre>`;
  }).join("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (role === "user") div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function showAnswer(div, text, stats) {
  div.innerHTML = renderMarkdown(text);
  if (stats) {
    const span = document.createElement("span");
    span.className = "stats";
    span.textContent = stats;
    div.appendChild(span);
  }
  div.scrollIntoView({ block: "end" });
}

function showError(div, message) {
  div.classList.remove("pending");
  div.classList.add("error");
  div.textContent = message;
}

function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
}

function askForKey() {
  $("key-panel").hidden = false;
  $("api-key").focus();
}

function numberSetting(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody(messages) {
  const body = {
    model: state.config ? state.config.model : "minicpm",
    messages: messages.map(({ role, content }) => ({ role, content })),
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const id of ["temperature", "top_p", "repetition_penalty", "max_tokens", "seed"]) {
    const value = numberSetting(id);
    if (value !== undefined && !Number.isNaN(value)) body[id] = value;
  }
  return body;
}

async function readError(response) {
  try {
    const { error } = await response.json();
    if (error && error.message) return error;
  } catch (_) { /* not JSON */ }
  return { message: response.statusText };
}

function errorMessage(status, error) {
  const hints = { 400: "Bad request", 401: "API key needed or wrong", 413: "Message too long", 429: "Server busy, try again shortly",
                  503: "Server unavailable", 504: "Timed out" };
  return `${hints[status] || "Error"} (${status}): ${error.message}`;
}

// The conversation no longer fits: the oldest `turns` user+assistant pairs leave the history sent to
// the model. Their bubbles stay on screen, dimmed, and a notice says what happened.
function dropOldestTurns(turns, before) {
  for (const message of state.messages.splice(0, 2 * turns)) {
    if (message.el) {
      message.el.classList.add("dropped");
      message.el.title = "No longer in the model's context · 已不在模型的上下文中";
    }
  }
  const size = state.config && state.config.context_window;
  const which = turns === 1 ? "the oldest turn" : `the ${turns} oldest turns`;
  const notice = document.createElement("div");
  notice.className = "notice";
  notice.setAttribute("role", "status");
  notice.textContent = `Dropped ${which} to fit the ${size ? `${size}-token ` : ""}context window · ` +
    `已移除最早的 ${turns} 轮对话以适应上下文长度`;
  $("messages").insertBefore(notice, before);
}

async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  const question = { role: "user", content: text, el: addMessage("user", text) };
  const bubble = addMessage("assistant", "");
  bubble.classList.add("pending");
  const chat = state.chat;
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let answer = "", firstAt = null, tokens = null, failed = false;
  try {
    // Too long for the context window: leave out the oldest turn and ask again, until it fits or only
    // the new question is left (then the server's message is shown). Nothing is dropped for good
    // unless a request gets through.
    let turns = 0, response;
    for (;;) {
      const messages = [...state.messages.slice(2 * turns), question];
      response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: state.controller.signal,
      });
      if (response.ok) break;
      const error = await readError(response);
      if (response.status === 400 && error.code === "context_length_exceeded" && messages.length > 2) {
        turns += 1;
        continue;
      }
      failed = true;
      showError(bubble, errorMessage(response.status, error));
      if (response.status === 401) askForKey();
      return;
    }
    if (turns > 0) dropOldestTurns(turns, bubble);
    for await (const event of serverEvents(response)) {
      if (event.error) { failed = true; showError(bubble, `Error: ${event.error.message}`); break; }
      if (event.usage) tokens = event.usage.completion_tokens;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        if (firstAt === null) firstAt = performance.now();
        answer += delta.content;
        showAnswer(bubble, answer);
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") { failed = true; showError(bubble, `Network error: ${err.message}`); }
  } finally {
    state.controller = null;
    setBusy(false);
    bubble.classList.remove("pending");
    // A failed question stays on screen but is not in the history sent next time.
    if (!failed && chat === state.chat) {
      state.messages.push(question, { role: "assistant", content: answer, el: bubble });
      showAnswer(bubble, answer, stats(started, firstAt, tokens, answer));
    }
    $("input").focus();
  }
}

function stats(started, firstAt, tokens, answer) {
  if (firstAt === null) return answer ? "" : "(stopped before the first token)";
  const end = performance.now();
  const ttft = Math.round(firstAt - started);
  if (tokens === null) return `first token ${ttft} ms · stopped`;
  const seconds = Math.max((end - firstAt) / 1000, 1e-3);
  return `${tokens} tokens · ${(tokens / seconds).toFixed(1)} tokens/s · first token ${ttft} ms`;
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.chat += 1;
  state.messages = [];
  $("messages").replaceChildren();
  $("input").focus();
}

function applyDefaults() {
  const d = (state.config && state.config.defaults) || {};
  $("temperature").value = d.temperature ?? "";
  $("top_p").value = d.top_p ?? "";
  $("repetition_penalty").value = d.repetition_penalty ?? "";
  $("max_tokens").value = "";
  $("seed").value = "";
  $("max_tokens").placeholder = state.config ? `auto (≤ ${state.config.context_window})` : "auto";
}

async function loadConfig() {
  try {
    const response = await fetch("/ui/config");
    state.config = await response.json();
    $("model-name").textContent = state.config.model;
    if (state.config.auth_required && !apiKey()) askForKey();
  } catch (_) { /* the page still works with the API's own defaults */ }
  applyDefaults();
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("reset-settings").addEventListener("click", applyDefaults);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-panel").hidden = true;
    $("input").focus();
  });
  loadConfig();
  $("input").focus();
});
