// The chat page's script (a file of its own: the page's Content-Security-Policy allows no inline script).
// The conversation lives here; each request sends all of it (plus the system prompt) to /v1/chat/completions
// with stream: true and shows the server-sent deltas as they arrive. Each answer has thumbs up/down, and a
// regenerated answer a switch back to the previous one: both are sent to /v1/feedback (the user's judgement
// of answers, comparison data for the reward model; a nolog key stores nothing).
const $ = (id) => document.getElementById(id);
const log = $("log");
let history = [];          // [{role, content, el, fid}]
let previous = null;       // the answer a regenerate replaces: {content, prompt}
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

function randomId() {  // crypto.randomUUID needs a secure context; getRandomValues does not
  return Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function conversation(upTo) {  // the messages a reply answers: system prompt, then the turns before it
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  for (const m of history.slice(0, upTo)) messages.push({role: m.role, content: m.content});
  return messages;
}

async function sendFeedback(reply, body) {
  const note = reply.el.querySelector(".feedback-note");
  note.textContent = "saving…";
  try {
    const r = await fetch("/v1/feedback", {method: "POST", headers: headers(),
                                           body: JSON.stringify({...body, messages: reply.prompt})});
    const answer = await r.json();
    if (!r.ok) throw new Error(answer.error.message);
    note.textContent = answer.logged ? "thanks: noted" : "(this key does not log feedback)";
  } catch (e) {
    note.textContent = "(feedback not saved: " + String(e.message || e) + ")";
  }
}

function thumb(reply, value) {
  const buttons = {up: reply.el.querySelector(".thumb-up"), down: reply.el.querySelector(".thumb-down")};
  const now = buttons[value].getAttribute("aria-pressed") === "true" ? "none" : value;  // a second click undoes
  for (const [name, button] of Object.entries(buttons)) button.setAttribute("aria-pressed", String(name === now));
  sendFeedback(reply, {id: reply.fid, kind: "thumb", answer: reply.content, value: now});
}

function swapAnswer(reply) {  // after a regenerate: keep the previous answer instead (or the new one again)
  const r = reply.regenerated;
  r.kept = 1 - r.kept;
  reply.content = r.answers[r.kept];
  reply.el.querySelector(".text").textContent = reply.content;
  reply.fid = randomId();  // thumbs from here on judge the answer now shown
  for (const b of reply.el.querySelectorAll(".thumb")) b.setAttribute("aria-pressed", "false");
  reply.el.querySelector(".keep-other").textContent = r.kept ? "Use the previous answer" : "Use the new answer";
  sendFeedback(reply, {id: r.id, kind: "regenerate", answers: r.answers, kept: r.kept});
}

function feedbackBar(reply) {
  const bar = document.createElement("div");
  bar.className = "feedback";
  for (const [value, label, text] of [["up", "Good answer", "\u{1F44D}"], ["down", "Bad answer", "\u{1F44E}"]]) {
    const button = document.createElement("button");
    button.className = "thumb thumb-" + value;
    button.textContent = text;
    button.title = label;
    button.setAttribute("aria-label", label);
    button.setAttribute("aria-pressed", "false");
    button.onclick = () => thumb(reply, value);
    bar.appendChild(button);
  }
  if (reply.regenerated) {
    const keep = document.createElement("button");
    keep.className = "keep-other";
    keep.textContent = "Use the previous answer";
    keep.onclick = () => swapAnswer(reply);
    bar.appendChild(keep);
  }
  const note = document.createElement("span");
  note.className = "feedback-note";
  note.setAttribute("role", "status");
  bar.appendChild(note);
  reply.el.appendChild(bar);
}

async function generate() {
  if (!modelName) await loadModel();
  const messages = conversation(history.length);
  const el = bubble("assistant", "");
  const text = document.createElement("div");
  text.className = "text";
  el.appendChild(text);
  const reply = {role: "assistant", content: "", el, fid: randomId(), prompt: messages};
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
        if (delta) { reply.content += delta; text.textContent = reply.content; log.scrollTop = log.scrollHeight; }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { el.className = "msg error"; el.textContent = String(e.message || e); }
  }
  controller = null;
  if (el.className === "msg assistant" && reply.content) {
    history.push(reply);
    if (previous) {  // a regenerate: two answers to one prompt, the new one kept unless the user switches back
      reply.regenerated = {id: randomId(), answers: [previous.content, reply.content], kept: 1};
    }
    feedbackBar(reply);
    if (reply.regenerated) {
      sendFeedback(reply, {id: reply.regenerated.id, kind: "regenerate", answers: reply.regenerated.answers, kept: 1});
    }
  } else if (el.className === "msg assistant") el.textContent = "(no reply)";
  previous = null;
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
  previous = null;
  while (history.length && history[history.length - 1].role === "assistant") {
    const old = history.pop();
    previous = {content: old.content};
    old.el.remove();
  }
  for (const el of log.querySelectorAll(".msg.error, .msg[data-done]:not(.user)")) {
    if (!history.some((m) => m.el === el)) el.remove();
  }
  if (history.length) generate();
};
$("reset").onclick = () => {
  if (controller) controller.abort();
  history = [];
  previous = null;
  log.replaceChildren();
  busy(false);
};
loadModel();
