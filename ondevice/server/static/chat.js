// The chat page served at "/": plain JavaScript, no build step, no external resources.
// It talks to the same OpenAI-compatible endpoints as any client: GET /v1/models for the
// picker, POST /v1/chat/completions with "stream": true for replies. Stop aborts the fetch;
// the server sees the disconnect and frees the request's KV blocks at once.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null, key: sessionStorage.getItem("ondevice-key") };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function addMessage(role, text) {
  const hint = document.querySelector(".hint");
  if (hint) hint.remove();
  const el = document.createElement("div");
  el.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.appendChild(body);
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function setMeta(el, text) {
  let meta = el.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta";
    el.appendChild(meta);
  }
  meta.textContent = text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("keybar").hidden = false;
    setStatus("this server needs an API key");
    return;
  }
  if (!response.ok) {
    setStatus("cannot list models: " + (await errorText(response)));
    return;
  }
  const data = (await response.json()).data || [];
  const select = $("model");
  select.replaceChildren();
  for (const card of data) {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.id;
    select.appendChild(option);
  }
  setStatus(data.length ? "ready" : "no models");
}

// Where a reply ran: a routed model's chunks say "ran_on"; a local model's fingerprint
// ("ondevice-numpy") names its backend.
function ranOn(chunk) {
  if (chunk.ran_on) return chunk.ran_on;
  const fp = chunk.system_fingerprint || "";
  return fp.startsWith("ondevice-") ? "local:" + fp.slice("ondevice-".length) : null;
}

async function send(text) {
  const model = $("model").value || undefined;
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const out = bubble.querySelector(".text");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.messages]
                          : state.messages.slice();
  const controller = new AbortController();
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating...");
  const started = performance.now();
  let first = null, reply = "", where = null, usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model, messages, stream: true,
                             stream_options: { include_usage: true } }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          where = ranOn(chunk) || where;
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const piece = (choice.delta && choice.delta.content) || "";
            if (piece && first === null) first = performance.now();
            reply += piece;
            out.textContent = reply;
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      bubble.scrollIntoView({ block: "end" });
    }
    const parts = [];
    if (where) parts.push("ran on " + where);
    if (usage) {
      parts.push(usage.completion_tokens + " tokens");
      const seconds = (performance.now() - (first || started)) / 1000;
      if (usage.completion_tokens > 1 && seconds > 0) {
        parts.push(((usage.completion_tokens - 1) / seconds).toFixed(1) + " tok/s");
      }
    }
    if (first !== null) parts.push("first token " + ((first - started) / 1000).toFixed(2) + " s");
    if (finish === "length") parts.push("cut at max tokens");
    setMeta(bubble, parts.join(" · "));
    setStatus(where ? "ready · ran on " + where : "ready");
  } catch (err) {
    if (err.name === "AbortError") {
      setMeta(bubble, "stopped" + (where ? " · ran on " + where : ""));
      setStatus("stopped");
    } else {
      bubble.classList.add("error");
      out.textContent = reply || String(err.message || err);
      if (reply) setMeta(bubble, "error: " + (err.message || err));
      setStatus("error");
    }
  } finally {
    state.messages.push({ role: "assistant", content: reply });
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("input").focus();
  }
}

function init() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    $("messages").replaceChildren();
  });
  $("savekey").addEventListener("click", () => {
    state.key = $("apikey").value.trim() || null;
    if (state.key) sessionStorage.setItem("ondevice-key", state.key);
    $("keybar").hidden = true;
    loadModels();
  });
  loadModels().catch((err) => setStatus("cannot list models: " + err));
}

init();
