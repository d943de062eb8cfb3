// pocketgpt web chat: plain JS, no build step. Streams replies from /v1/chat/completions (server-sent events)
// with fetch + ReadableStream; keeps the conversation in memory so every request carries the whole history.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop"), errorBox = $("error");
const temperature = $("temperature"), temperatureValue = $("temperature-value");
const maxTokens = $("max-tokens"), systemPrompt = $("system"), apiKey = $("api-key");

let history = [];        // [{role, content}] of finished turns
let modelId = null;
let controller = null;   // AbortController of the reply being streamed

// ---- settings survive a reload --------------------------------------------------------------------------------
for (const [el, key] of [[temperature, "temperature"], [maxTokens, "maxTokens"], [systemPrompt, "system"], [apiKey, "apiKey"]]) {
  const saved = localStorage.getItem("pocketgpt." + key);
  if (saved !== null) el.value = saved;
  el.addEventListener("input", () => { localStorage.setItem("pocketgpt." + key, el.value); showTemperature(); });
}
function showTemperature() { temperatureValue.textContent = Number(temperature.value).toFixed(2); }
showTemperature();

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey.value.trim()) h["Authorization"] = "Bearer " + apiKey.value.trim();
  return h;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

async function errorMessage(resp) {
  // the server answers OpenAI-style {"error": {"message": ...}}; anything else is shown as it is
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return `Error ${resp.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `Error ${resp.status}: ${text || resp.statusText}`;
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { showError(await errorMessage(resp) + (resp.status === 401 ? " (enter the API key in Settings)" : "")); return; }
    const body = await resp.json();
    modelId = body.data[0].id;
    $("model-name").textContent = `${modelId} · context ${body.data[0].context_length ?? "?"} tokens`;
    showError("");
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
  }
}

function addBubble(role, text) {
  $("hint")?.remove();
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setBusy(busy) {
  sendBtn.disabled = busy;
  stopBtn.disabled = !busy;
}

// Parse a server-sent-events byte stream; calls onData(json) for each "data:" event until [DONE].
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder("utf-8");  // stream: true keeps a Chinese character split across chunks whole
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  showError("");
  const userTurn = { role: "user", content: text };
  const userBubble = addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  const out = bubble.querySelector(".text");
  let reply = "", finish = null;

  const messages = [];
  if (systemPrompt.value.trim()) messages.push({ role: "system", content: systemPrompt.value.trim() });
  messages.push(...history, userTurn);
  const request = { messages, temperature: Number(temperature.value), stream: true };
  if (modelId) request.model = modelId;
  if (maxTokens.value) request.max_tokens = Number(maxTokens.value);

  controller = new AbortController();
  setBusy(true);
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    await readEvents(resp, (chunk) => {
      if (chunk.error) throw new Error("Error: " + chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          out.textContent = reply;
          log.scrollTop = log.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    history.push(userTurn, { role: "assistant", content: reply });
    if (finish === "length") note(bubble, "(cut at the token limit)");
    if (!reply) note(bubble, "(empty reply)");
  } catch (e) {
    if (e.name === "AbortError") {
      history.push(userTurn, { role: "assistant", content: reply });  // keep what was written before Stop
      note(bubble, "(stopped)");
    } else {
      bubble.remove();
      userBubble.remove();
      showError(e.message.startsWith("Error") ? e.message : "Request failed: " + e.message);
      input.value = input.value || text;  // nothing is lost: the message goes back into the box
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    controller = null;
    setBusy(false);
    input.focus();
  }
}

function note(bubble, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  bubble.append(span);
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {  // isComposing: Chinese IME selection uses Enter
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
stopBtn.addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  log.replaceChildren();
  showError("");
});
apiKey.addEventListener("change", loadModel);
loadModel();
