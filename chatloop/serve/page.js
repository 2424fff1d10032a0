// The chat page's script (a file of its own: the page's Content-Security-Policy allows no inline script).
// The conversation lives here; each request sends all of it (plus the system prompt) to /v1/chat/completions
// with stream: true and shows the server-sent deltas as they arrive.
const $ = (id) => document.getElementById(id);
const log = $("log");
let history = [];          // [{role, content, el}]
let controller = null;     // AbortController of the running request
let modelName = null;

// The key is kept for this tab only (sessionStorage, gone when the tab closes), never in localStorage.
$("key").value = sessionStorage.getItem("chatloop-key") || "";
$("key").addEventListener("change", () => { sessionStorage.setItem("chatloop-key", $("key").value); loadModel(); });

function headers() {
  return {"Content-Type": "application/json", "Authorization": "Bearer " + $("key").value.trim()};
}

async function loadModel() {
  if (!$("key").value.trim()) { $("model").textContent = "(enter an API key)"; return; }
  const r = await fetch("/v1/models", {headers: headers()});
  const body = await r.json();
  if (!r.ok) { $("model").textContent = "(" + body.error.message + ")"; return; }
  modelName = body.data[0].id;
  $("model").textContent = modelName;
}

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.textContent = text;
  log.appendChild(el);
  log.scrollTop = log.scrollHeight;
  return el;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("regenerate").disabled = on || !history.some((m) => m.role === "assistant");
}

async function generate() {
  if (!modelName) await loadModel();
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  for (const m of history) messages.push({role: m.role, content: m.content});
  const el = bubble("assistant", "");
  const reply = {role: "assistant", content: "", el};
  controller = new AbortController();
  busy(true);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({model: modelName, messages, stream: true,
                            temperature: parseFloat($("temperature").value),
                            max_tokens: parseInt($("max_tokens").value)}),
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const delta = JSON.parse(event.slice(6)).choices[0]?.delta?.content;
        if (delta) { reply.content += delta; el.textContent = reply.content; log.scrollTop = log.scrollHeight; }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { el.className = "msg error"; el.textContent = String(e.message || e); }
  }
  controller = null;
  if (el.className === "msg assistant" && reply.content) history.push(reply);
  else if (el.className === "msg assistant") el.textContent = "(no reply)";
  el.dataset.done = "true";
  busy(false);
}

function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  history.push({role: "user", content: text, el: bubble("user", text)});
  generate();
}

$("send").onclick = send;
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
$("stop").onclick = () => controller && controller.abort();
$("regenerate").onclick = () => {
  if (controller) return;
  while (history.length && history[history.length - 1].role === "assistant") history.pop().el.remove();
  for (const el of log.querySelectorAll(".msg.error, .msg[data-done]:not(.user)")) {
    if (!history.some((m) => m.el === el)) el.remove();
  }
  if (history.length) generate();
};
$("reset").onclick = () => { if (controller) controller.abort(); history = []; log.replaceChildren(); busy(false); };
loadModel();
