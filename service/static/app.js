// The playground: plain JavaScript, no dependencies. Model text is only ever set with textContent.
"use strict";

const KEY_STORAGE = "aigc-api-key";
const $ = (id) => document.getElementById(id);
let modelId = null;

// ------------------------------------------------------------------ API keys
let keyPrompt = null; // one pending prompt shared by every call that got a 401

function askForKey(refused) {
  if (keyPrompt) return keyPrompt;
  const form = $("auth");
  $("auth-message").textContent = refused
    ? "That key was refused. Enter a valid API key."
    : "This server needs an API key. It is kept in this tab only (sessionStorage).";
  form.hidden = false;
  $("api-key").focus();
  keyPrompt = new Promise((resolve) => {
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      form.hidden = true;
      keyPrompt = null;
      resolve();
    };
  });
  return keyPrompt;
}

// fetch with the stored key; a 401 asks for a key and retries
async function api(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = Object.assign({}, options.headers || {});
    if (key) headers["Authorization"] = "Bearer " + key;
    const res = await fetch(path, Object.assign({}, options, { headers }));
    if (res.status !== 401) return res;
    if (key) sessionStorage.removeItem(KEY_STORAGE);
    await askForKey(Boolean(key));
  }
}

function postJSON(path, body, signal) {
  return api(path, {
    method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "Accept": body.stream ? "text/event-stream" : "application/json" },
  });
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return `${res.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${res.status} ${res.statusText}`;
}

// Server-sent events over a fetch body: calls onData(obj) for each `data:` JSON until [DONE]
async function readSSE(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message || "stream error");
      onData(obj);
    }
  }
}

function numberOr(id, parse = Number) {
  const v = $(id).value.trim();
  if (v === "") return undefined;
  const n = parse(v);
  return Number.isFinite(n) ? n : undefined;
}

function setBusy(send, stop, busy) {
  $(send).disabled = busy;
  $(stop).disabled = !busy;
}

// ------------------------------------------------------------------ chat
const chatHistory = []; // {role, content}
let chatAbort = null;

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const who = document.createElement("strong");
  who.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  box.append(who, content);
  $("conversation").append(box);
  box.scrollIntoView({ block: "end" });
  return content;
}

async function sendChat() {
  const input = $("chat-input");
  const text = input.value;
  const error = $("chat-error");
  error.textContent = "";
  if (!text.trim() || chatAbort) return;
  const body = {
    model: modelId || undefined,
    messages: [],
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberOr("chat-temperature"),
    top_p: numberOr("chat-top-p"),
    max_tokens: numberOr("chat-max-tokens", parseInt),
    seed: numberOr("chat-seed", parseInt),
  };
  const schemaText = $("chat-schema").value.trim();
  if (schemaText) {
    let schema;
    try {
      schema = JSON.parse(schemaText);
    } catch (e) {
      error.textContent = "JSON schema is not valid JSON: " + e.message;
      return;
    }
    body.response_format = { type: "json_schema", json_schema: { name: "schema", schema } };
  }
  const system = $("chat-system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  chatHistory.push({ role: "user", content: text });
  body.messages.push(...chatHistory);
  addMessage("user", text);
  input.value = "";
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  chatAbort = new AbortController();
  setBusy("chat-send", "chat-stop", true);
  const start = performance.now();
  let first = null, chunks = 0, usage = null, reply = "";
  try {
    const res = await postJSON("/v1/chat/completions", body, chatAbort.signal);
    if (!res.ok) throw new Error(await errorMessage(res));
    await readSSE(res, (obj) => {
      if (obj.usage) usage = obj.usage;
      for (const choice of obj.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (first === null) first = performance.now();
          chunks += 1;
          reply += piece;
          out.append(piece); // a text node: never parsed as HTML
        }
      }
    });
  } catch (e) {
    if (e.name === "AbortError") {
      out.parentElement.classList.add("stopped");
    } else {
      error.textContent = e.message;
    }
  } finally {
    out.parentElement.classList.remove("streaming");
    if (reply) chatHistory.push({ role: "assistant", content: reply });
    chatAbort = null;
    setBusy("chat-send", "chat-stop", false);
    showSpeed(start, first, usage ? usage.completion_tokens : chunks);
  }
}

function showSpeed(start, first, tokens) {
  if (first === null) return;
  const end = performance.now();
  $("stat-ttft").textContent = `${Math.round(first - start)} ms`;
  const secs = (end - first) / 1000;
  $("stat-tps").textContent = tokens > 1 && secs > 0 ? `${((tokens - 1) / secs).toFixed(1)}` : "–";
}

// ------------------------------------------------------------------ completions
let compAbort = null;

async function sendCompletion() {
  const error = $("comp-error");
  const output = $("comp-output");
  error.textContent = "";
  if (compAbort) return;
  output.replaceChildren();
  const body = {
    model: modelId || undefined,
    prompt: $("comp-prompt").value,
    stream: true,
    stream_options: { include_usage: true },
    logprobs: 1,
    temperature: numberOr("comp-temperature"),
    max_tokens: numberOr("comp-max-tokens", parseInt),
    seed: numberOr("comp-seed", parseInt),
  };
  compAbort = new AbortController();
  setBusy("comp-send", "comp-stop", true);
  const start = performance.now();
  let first = null, count = 0, usage = null;
  try {
    const res = await postJSON("/v1/completions", body, compAbort.signal);
    if (!res.ok) throw new Error(await errorMessage(res));
    await readSSE(res, (obj) => {
      if (obj.usage) usage = obj.usage;
      for (const choice of obj.choices || []) {
        const lp = choice.logprobs;
        const tokens = lp && lp.tokens ? lp.tokens : [];
        if (!choice.text && !tokens.length) continue;
        if (first === null) first = performance.now();
        if (tokens.length && tokens.join("") === choice.text) {
          tokens.forEach((t, i) => addToken(t, lp.token_logprobs[i]));
        } else { // multi-byte characters split over tokens: one box for the text
          const lps = lp && lp.token_logprobs ? lp.token_logprobs.filter((x) => x !== null) : [];
          addToken(choice.text, lps.length ? lps.reduce((a, b) => a + b, 0) : null);
        }
        count += Math.max(tokens.length, 1);
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") error.textContent = e.message;
  } finally {
    compAbort = null;
    setBusy("comp-send", "comp-stop", false);
    showSpeed(start, first, usage ? usage.completion_tokens : count);
  }
}

function addToken(text, logprob) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (typeof logprob === "number") {
    span.title = `logprob ${logprob.toFixed(3)} (p = ${Math.exp(logprob).toFixed(3)})`;
  }
  $("comp-output").append(span);
}

// ------------------------------------------------------------------ images
async function generateImages(interpolate) {
  const error = $("img-error");
  error.textContent = "";
  const digit = $("img-digit").value.trim();
  const body = { prompt: digit, size: "64x64" };
  let target, describe;
  if (interpolate) {
    const a = numberOr("interp-a", parseInt) ?? 0, b = numberOr("interp-b", parseInt) ?? 1;
    const steps = numberOr("interp-steps", parseInt) ?? 8;
    Object.assign(body, { n: 1, interpolate: { seeds: [a, b], steps } });
    target = $("interp-output");
    describe = (i, n) => `Digit ${digit}, frame ${i + 1} of ${n} from seed ${a} to seed ${b}`;
  } else {
    Object.assign(body, { n: numberOr("img-count", parseInt) ?? 1, seed: numberOr("img-seed", parseInt) });
    target = $("img-output");
    describe = (i, n, seed) => `Digit ${digit}, image ${i + 1} of ${n}` + (seed !== null ? ` (seed ${seed + i})` : "");
  }
  const buttons = [$("img-send"), $("interp-send")];
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const res = await postJSON("/v1/images/generations", body);
    if (!res.ok) throw new Error(await errorMessage(res));
    const result = await res.json();
    const seed = typeof result.seed === "number" ? result.seed : null;
    target.replaceChildren(...result.data.map((d, i) => {
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + d.b64_json;
      img.alt = describe(i, result.data.length, seed);
      img.width = 64;
      img.height = 64;
      return img;
    }));
  } catch (e) {
    error.textContent = e.message;
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

// ------------------------------------------------------------------ live metrics
const SERIES = { running: [], waiting: [], kv: [] };
const KEEP = 60; // two minutes at one sample every 2 s

function parseMetrics(text) {
  const wanted = {
    aigc_num_requests_running: "running", aigc_num_requests_waiting: "waiting", aigc_kv_cache_usage_ratio: "kv",
  };
  const out = {};
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m || !(m[1] in wanted)) continue;
    const label = /model="([^"]*)"/.exec(m[2] || "");
    if (modelId && label && label[1] !== modelId) continue; // the chosen model's gauges only
    const v = Number(m[3]);
    if (Number.isFinite(v)) out[wanted[m[1]]] = (out[wanted[m[1]]] || 0) + v;
  }
  return out;
}

function drawChart() {
  const w = 300, h = 100;
  const top = Math.max(1, ...SERIES.running, ...SERIES.waiting);
  const line = (values, scale) => values.map((v, i) => {
    const x = (w * (KEEP - values.length + i)) / (KEEP - 1);
    return `${x.toFixed(1)},${(h - 2 - (h - 4) * (v / scale)).toFixed(1)}`;
  }).join(" ");
  $("line-running").setAttribute("points", line(SERIES.running, top));
  $("line-waiting").setAttribute("points", line(SERIES.waiting, top));
  $("line-kv").setAttribute("points", line(SERIES.kv, 1));
}

async function pollMetrics() {
  try {
    const res = await api("/metrics");
    if (!res.ok) throw new Error(`/metrics: ${res.status}`);
    const m = parseMetrics(await res.text());
    $("metrics-error").textContent = "";
    refreshModels();
    if (m.running === undefined) return; // the model is not loaded (yet)
    $("stat-running").textContent = String(m.running);
    $("stat-waiting").textContent = String(m.waiting ?? 0);
    $("stat-kv").textContent = `${((m.kv ?? 0) * 100).toFixed(1)}%`;
    for (const k of ["running", "waiting", "kv"]) {
      SERIES[k].push(m[k] ?? 0);
      if (SERIES[k].length > KEEP) SERIES[k].shift();
    }
    drawChart();
  } catch (e) {
    $("metrics-error").textContent = "Metrics unavailable: " + e.message;
  }
}

// ------------------------------------------------------------------ models
// The picker lists /v1/models' text models with whether each is loaded (a request for one that is not loads it).
async function textModels() {
  const res = await api("/v1/models");
  if (!res.ok) throw new Error(await errorMessage(res));
  const body = await res.json();
  return (body.data || []).filter((m) => !m.kind || m.kind === "text-generation");
}

function optionText(m) {
  return m.status && m.status.value ? `${m.id} (${m.status.value}${m.status.failed ? ", failed" : ""})` : m.id;
}

function chooseModel(id) {
  modelId = id;
  $("model-id").textContent = modelId || "none";
  for (const k of Object.keys(SERIES)) SERIES[k].length = 0; // the chart follows the chosen model
}

async function loadModel() {
  try {
    const models = await textModels();
    const picker = $("model-picker");
    picker.replaceChildren(...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = optionText(m);
      return option;
    }));
    picker.hidden = models.length < 2; // one model: nothing to pick
    chooseModel(models.length ? models[0].id : null);
  } catch (e) {
    $("model-id").textContent = "unavailable (" + e.message + ")";
  }
}

async function refreshModels() {
  const picker = $("model-picker");
  if (picker.hidden) return;
  try {
    const byId = new Map((await textModels()).map((m) => [m.id, m]));
    for (const option of picker.options) {
      const m = byId.get(option.value);
      if (m) option.textContent = optionText(m);
    }
  } catch (_) { /* shown by the next request */ }
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  $("chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendChat(); });
  $("chat-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => { if (chatAbort) chatAbort.abort(); });
  $("chat-clear").addEventListener("click", () => {
    if (chatAbort) chatAbort.abort();
    chatHistory.length = 0;
    $("conversation").replaceChildren();
  });
  $("comp-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendCompletion(); });
  $("comp-stop").addEventListener("click", () => { if (compAbort) compAbort.abort(); });
  $("img-form").addEventListener("submit", (ev) => { ev.preventDefault(); generateImages(false); });
  $("interp-send").addEventListener("click", () => generateImages(true));
  $("model-picker").addEventListener("change", (ev) => chooseModel(ev.target.value));
  loadModel();
  pollMetrics();
  setInterval(pollMetrics, 2000);
});
