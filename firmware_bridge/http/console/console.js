// The unitbus web console: one WebSocket to the gateway (/console/ws), four views. No framework, no build.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
};

let ws = null;
let models = [];
let nextId = 1;
const handlers = {};       // message type -> function(message)
const waiting = {};        // request id -> callbacks of a chat, transcription or speech

// connection --------------------------------------------------------------------------------------
function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${proto}://${location.host}/console/ws`);
  ws.onopen = () => ws.send(JSON.stringify({ type: "hello", key: sessionStorage.getItem("unitbus-key") || "" }));
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    const handler = handlers[message.type];
    if (handler) handler(message);
  };
  ws.onclose = (event) => {
    ws = null;
    // What was running on the board for this page ended with the socket (the gateway stops it).
    for (const callbacks of Object.values(waiting)) if (callbacks.error) callbacks.error({ message: "the connection to the board was lost" });
    busAsked = false;
    if ($("#handsfree").getAttribute("aria-pressed") === "true") { setHandsfree(false); hfEvent("stopped: the connection was lost", true); }
    if (event.code === 4401) return;  // the key form is showing; it reconnects
    $("#link-state").textContent = "disconnected; reconnecting…";
    setTimeout(connect, 2000);
  };
}

function send(message) {
  if (!ws || ws.readyState !== WebSocket.OPEN) throw new Error("not connected to the board");
  ws.send(JSON.stringify(message));
}

handlers.hello = (message) => {
  models = message.models;
  $("#key-form").hidden = true;
  $("main").hidden = false;
  $("#link-state").textContent = "connected";
  const select = $("#model");
  const previous = select.value;
  select.replaceChildren(...models.filter((m) => m.type === "llm").map((m) => el("option", { value: m.mode, textContent: m.mode })));
  if (previous) select.value = previous;
  if (!select.value && select.options.length) select.selectedIndex = 0;
  document.body.dataset.ready = "true";
  if (!$("#view-bus").hidden) refreshBus();
};

handlers.error = (message) => {
  if (message.for === "hello") {
    $("main").hidden = true;
    $("#key-form").hidden = false;
    $("#link-state").textContent = "this board asks for its API key";
    $("#key-error").textContent = sessionStorage.getItem("unitbus-key") ? message.message : "";
    $("#key").focus();
    return;
  }
  const callbacks = message.id != null ? waiting[message.id] : null;
  if (callbacks && callbacks.error) { callbacks.error(message); return; }
  if (message.for === "bus") { $("#bus-error").textContent = message.message; scheduleBus(); return; }
  if (message.for === "handsfree") { hfEvent(`error: ${message.message}`, true); setHandsfree(false); return; }
  if (message.for === "raw") { rawLine(message.message, "err"); return; }
  $("#link-state").textContent = `error: ${message.message}`;
};

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("unitbus-key", $("#key").value);
  if (ws) ws.close(); else connect();
});

// tabs (arrow keys move between them, as the ARIA tabs pattern) -------------------------------------
const tabs = [...document.querySelectorAll("[role=tab]")];
function selectTab(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", on);
    t.tabIndex = on ? 0 : -1;
    $("#" + t.getAttribute("aria-controls")).hidden = !on;
  }
  if (tab.id === "tab-bus") refreshBus();
}
tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(i + step + tabs.length) % tabs.length];
    selectTab(next);
    next.focus();
  });
});

// chat ----------------------------------------------------------------------------------------------
let history = [];
let running = null;  // id of the chat being generated

$("#constraint").addEventListener("change", () => {
  const kind = $("#constraint").value;
  $("#constraint-text-label").hidden = !["json_schema", "gbnf", "lark"].includes(kind);
  const text = $("#constraint-text");
  if (kind === "json_schema" && !text.value) text.value = '{"type":"object","properties":{"answer":{"type":"string"}},"required":["answer"]}';
  if (kind === "gbnf" && !text.value) text.value = 'root ::= "yes" | "no"';
});

function numberField(id, body, key = id) {
  const value = $("#" + id).value.trim();
  if (value !== "") body[key] = Number(value);
}

function chatRequest() {
  const body = { model: $("#model").value, messages: [] };
  const system = $("#system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  body.messages.push(...history);
  for (const key of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) numberField(key, body);
  const kind = $("#constraint").value;
  const text = $("#constraint-text").value;
  let grammar = null;
  if (kind === "json_object") body.response_format = { type: "json_object" };
  if (kind === "json_schema") {
    let schema;
    try { schema = JSON.parse(text); } catch (err) { throw new Error(`the JSON schema is not JSON: ${err.message}`); }
    body.response_format = { type: "json_schema", json_schema: { name: "console", schema } };
  }
  if (kind === "gbnf" || kind === "lark") grammar = { type: kind, text };
  return { body, grammar };
}

function addMessage(role, text) {
  const content = el("span", { className: "content", textContent: text });
  const item = el("li", { className: role }, el("span", { className: "role", textContent: role }), content);
  $("#messages").append(item);
  item.scrollIntoView({ block: "end" });
  return { item, content };
}

// Sends `text` as the next user turn; resolves with the answer (also when stopped), rejects on an error.
function chat(text) {
  return new Promise((resolve, reject) => {
    if (running) { reject(new Error("a reply is still being generated")); return; }
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const { item, content } = addMessage("assistant", "");
    const note = el("span", { className: "note" });
    item.append(note);
    let request;
    try { request = chatRequest(); } catch (err) {
      history.pop();
      note.textContent = err.message; note.classList.add("error"); note.setAttribute("role", "alert");
      reject(err); return;
    }
    const id = `chat${nextId++}`;
    running = id;
    item.dataset.id = id;
    item.setAttribute("aria-busy", "true");
    $("#stop").disabled = false;
    $("#send").disabled = true;
    let chunks = 0;  // streamed deltas (a delta may hold several tokens)
    const finish = () => {
      running = null;
      delete waiting[id];
      item.removeAttribute("aria-busy");
      $("#stop").disabled = true;
      $("#send").disabled = false;
    };
    waiting[id] = {
      status: (message) => {
        const bar = el("progress", { max: 100, value: message.percent });
        bar.setAttribute("aria-label", `${message.stage} ${message.model}`);
        note.replaceChildren(`${message.stage} ${message.model}… ${message.percent} %`, bar);
        item.dataset.progress = (item.dataset.progress ? item.dataset.progress + "," : "") + `${message.stage}:${message.percent}`;
      },
      start: () => { note.textContent = ""; },
      token: (message) => { chunks += 1; content.textContent += message.delta; item.dataset.chunks = chunks; },
      done: (message) => {
        finish();
        history.push({ role: "assistant", content: content.textContent });
        const used = message.usage && message.usage.completion_tokens;
        if (used != null) item.dataset.completionTokens = used;
        const why = message.stopped ? "stopped" : (message.finish_reason === "length" ? "cut at max tokens" : "");
        note.textContent = [why, used != null ? `${used} tokens` : ""].filter(Boolean).join(", ");
        item.dataset.finish = message.stopped ? "stopped" : message.finish_reason;
        resolve(content.textContent);
      },
      error: (message) => {
        finish();
        history.pop();
        note.textContent = message.message;
        note.classList.add("error");
        note.setAttribute("role", "alert");
        item.dataset.finish = "error";
        reject(new Error(message.message));
      },
    };
    try { send({ type: "chat", id, body: request.body, grammar: request.grammar }); } catch (err) { waiting[id].error({ message: err.message }); }
  });
}

for (const type of ["status", "start", "token", "done", "transcript", "speech"]) {
  handlers[type] = (message) => {
    const callbacks = waiting[message.id];
    if (callbacks && callbacks[type]) callbacks[type](message);
  };
}

$("#chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || running) return;
  $("#prompt").value = "";
  chat(text).catch(() => {});
});
$("#prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("#chat-form").requestSubmit(); }
});
$("#stop").addEventListener("click", () => { if (running) send({ type: "stop", id: running }); });
$("#clear").addEventListener("click", () => { if (!running) { history = []; $("#messages").replaceChildren(); } });

// voice: push-to-talk -------------------------------------------------------------------------------
let audio = null;          // one AudioContext, made at the first press (browsers want a gesture)
let capture = null;
let played = 0;

function b64encode(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}
function b64decode(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// The microphone's float samples at the context rate as 16 kHz S16LE, averaging each output sample's span.
function toPcm16k(chunks, rate) {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const input = new Float32Array(total);
  let offset = 0;
  for (const c of chunks) { input.set(c, offset); offset += c.length; }
  const ratio = rate / 16000;
  const out = new Int16Array(Math.floor(total / ratio));
  for (let i = 0; i < out.length; i++) {
    const start = Math.floor(i * ratio), end = Math.max(start + 1, Math.floor((i + 1) * ratio));
    let sum = 0;
    for (let j = start; j < end; j++) sum += input[j];
    const v = Math.max(-1, Math.min(1, sum / (end - start)));
    out[i] = v < 0 ? v * 32768 : v * 32767;
  }
  return new Uint8Array(out.buffer);
}

function voiceStatus(text) { $("#voice-status").textContent = text; }

async function startTalk() {
  if (capture) return;
  audio = audio || new AudioContext();
  await audio.resume();
  const talk = $("#talk");
  talk.setAttribute("aria-pressed", "true");
  talk.textContent = "Listening… release to send";
  capture = { chunks: [], pending: true };
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false,
      noiseSuppression: false, autoGainControl: false } });
    const source = audio.createMediaStreamSource(stream);
    const tap = audio.createScriptProcessor(4096, 1, 1);
    tap.onaudioprocess = (event) => capture && capture.chunks.push(new Float32Array(event.inputBuffer.getChannelData(0)));
    source.connect(tap);
    tap.connect(audio.destination);
    Object.assign(capture, { stream, source, tap, pending: false });
    voiceStatus("listening");
    if (capture.release) stopTalk();
  } catch (err) {
    capture = null;
    talk.setAttribute("aria-pressed", "false");
    talk.textContent = "Hold to talk";
    voiceStatus(`no microphone: ${err.message}`);
  }
}

function stopTalk() {
  if (!capture) return;
  if (capture.pending) { capture.release = true; return; }
  const { stream, source, tap, chunks } = capture;
  capture = null;
  tap.disconnect(); source.disconnect();
  stream.getTracks().forEach((t) => t.stop());
  const talk = $("#talk");
  talk.setAttribute("aria-pressed", "false");
  talk.textContent = "Hold to talk";
  const pcm = toPcm16k(chunks, audio.sampleRate);
  const id = `asr${nextId++}`;
  voiceStatus(`transcribing ${(pcm.length / 32000).toFixed(1)} s of speech…`);
  const turn = el("li", { textContent: "…" });
  $("#voice-log").append(turn);
  waiting[id] = {
    status: (message) => voiceStatus(`${message.stage} ${message.model}… ${message.percent} %`),
    transcript: (message) => {
      delete waiting[id];
      turn.textContent = `you: ${message.text || "(nothing heard)"}`;
      turn.dataset.transcript = message.text;
      if (!message.text) { voiceStatus("nothing heard"); return; }
      voiceStatus("thinking…");
      chat(message.text).then((answer) => {
        turn.append(el("br"), `answer: ${answer}`);
        if ($("#speak-answers").checked && answer.trim()) speak(answer); else voiceStatus("");
      }, (err) => voiceStatus(err.message));
    },
    error: (message) => { delete waiting[id]; turn.textContent = message.message; turn.classList.add("error"); voiceStatus(message.message); },
  };
  send({ type: "transcribe", id, pcm: b64encode(pcm) });
}

function speak(text) {
  const id = `tts${nextId++}`;
  voiceStatus("speaking…");
  waiting[id] = {
    status: (message) => voiceStatus(`${message.stage} ${message.model}… ${message.percent} %`),
    speech: (message) => { delete waiting[id]; play(message); },
    error: (message) => { delete waiting[id]; voiceStatus(message.message); },
  };
  send({ type: "speak", id, text });
}

function play(message) {
  const bytes = b64decode(message.pcm);
  const samples = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  if (!samples.length) { voiceStatus("the answer produced no audio"); return; }
  const buffer = audio.createBuffer(1, samples.length, message.rate);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
  const node = audio.createBufferSource();
  node.buffer = buffer;
  node.connect(audio.destination);
  const started = audio.currentTime;
  node.onended = () => {
    played += 1;
    document.body.dataset.played = played;
    document.body.dataset.playedSeconds = (audio.currentTime - started).toFixed(2);
    voiceStatus(`played ${buffer.duration.toFixed(1)} s of speech`);
  };
  node.start();
}

const talk = $("#talk");
talk.addEventListener("pointerdown", (event) => { event.preventDefault(); talk.setPointerCapture(event.pointerId); startTalk(); });
talk.addEventListener("pointerup", stopTalk);
talk.addEventListener("pointercancel", stopTalk);
talk.addEventListener("keydown", (event) => {
  if ((event.key === " " || event.key === "Enter") && !event.repeat) { event.preventDefault(); startTalk(); }
});
talk.addEventListener("keyup", (event) => { if (event.key === " " || event.key === "Enter") stopTalk(); });

// voice: hands-free ---------------------------------------------------------------------------------
function setHandsfree(on) {
  const button = $("#handsfree");
  button.setAttribute("aria-pressed", on);
  button.textContent = on ? "Stop hands-free" : "Start hands-free";
  button.disabled = false;
}
function hfEvent(text, bad = false) {
  const item = el("li", { textContent: text });
  if (bad) item.classList.add("error");
  $("#hf-events").append(item);
  return item;
}
let hfLine = null;  // the llm answer being streamed, one line
$("#handsfree").addEventListener("click", () => {
  const on = $("#handsfree").getAttribute("aria-pressed") !== "true";
  $("#handsfree").disabled = true;
  if (on) hfEvent("setting up kws → asr → llm → tts…");
  const temperature = $("#temperature").value.trim();
  send({ type: "handsfree", on, wake: $("#wake").value, prompt: $("#system").value,
         ...(temperature !== "" ? { temperature: Number(temperature) } : {}) });
});
handlers.handsfree = (message) => {
  setHandsfree(message.on);
  hfEvent(message.on ? `listening (${message.tasks.join(", ")})` : "stopped");
};
handlers.event = (message) => {
  if (message.code) { hfEvent(`${message.work_id}: error ${message.code} ${message.message}`, true); return; }
  const data = message.data;
  if (message.object === "setup") { hfEvent(`${message.work_id}: set up`); return; }
  if (message.work_id.startsWith("llm.") && data && typeof data === "object" && "delta" in data) {
    if (!hfLine) hfLine = hfEvent(`${message.work_id}: `);
    hfLine.textContent += data.delta;
    if (data.finish) hfLine = null;
    return;
  }
  const shown = data && typeof data === "object" ? ("delta" in data ? data.delta : JSON.stringify(data)) : String(data);
  const item = hfEvent(`${message.work_id} ${message.object}: ${shown}`);
  item.dataset.object = message.object;
};

// bus view ------------------------------------------------------------------------------------------
let busTimer = null;
let busAsked = false;
function refreshBus() {
  if (busAsked || !ws || ws.readyState !== WebSocket.OPEN) return;
  busAsked = true;
  send({ type: "bus" });
}
function scheduleBus() {
  busAsked = false;
  clearTimeout(busTimer);
  if (!$("#view-bus").hidden) busTimer = setTimeout(refreshBus, 2000);
}
function rows(table, list, cells) {
  $(table + " tbody").replaceChildren(...list.map((item) => el("tr", {}, ...cells(item).map((c) => el("td", {}, c)))));
}
handlers.bus = (message) => {
  $("#bus-error").textContent = message.error || "";
  const hw = message.hwinfo || {};
  const facts = [
    ["CPU load", hw.cpu_loadavg != null ? `${hw.cpu_loadavg} %` : "?"],
    ["memory used", hw.mem != null ? `${hw.mem} %` : "?"],
    ["temperature", hw.temperature ? `${(hw.temperature / 1000).toFixed(1)} °C` : "not reported"],
    ...(hw.eth_info || []).map((e) => [e.name, e.ip || "no address"]),
  ];
  $("#hwinfo").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]));
  rows("#units", message.units, (u) => {
    const state = el("span", { className: `state-${u.state.replace(" ", "-")}`, textContent: u.state });
    return [u.unit, state, String(u.pid ?? ""), String(u.tasks ?? ""), u.version || ""];
  });
  rows("#tasks", message.tasks, (t) => [t.work_id, t.model || "", (t.inputs || []).join(", "), t.state || ""]);
  rows("#models", message.models, (m) => [m.mode, m.type, m.license || "not stated", m.capabilities.join(", ")]);
  showLoads(message.loads);
  drawGraph(message.tasks, message.links);
  document.body.dataset.busUpdates = Number(document.body.dataset.busUpdates || 0) + 1;
  scheduleBus();
};
// A load (a conversion) moves fast: while one runs, its progress is polled every 250 ms on its own.
let loadsTimer = null;
function showLoads(loads) {
  $("#loads-card").hidden = !loads.length;
  $("#loads").replaceChildren(...loads.map((l) => {
    const bar = el("progress", { max: 100, value: l.percent });
    bar.setAttribute("aria-label", `${l.stage} ${l.mode}`);
    const item = el("li", { textContent: `${l.mode} (${l.unit}): ${l.stage} ${l.percent} % ` }, bar);
    item.dataset.stage = l.stage;
    return item;
  }));
  clearTimeout(loadsTimer);
  if (loads.length && !$("#view-bus").hidden) {
    loadsTimer = setTimeout(() => { if (ws && ws.readyState === WebSocket.OPEN) send({ type: "bus", only: "loads" }); }, 250);
  }
}
handlers.loads = (message) => showLoads(message.loads);

// Tasks as boxes in columns by depth (a task is one column right of what feeds it), links as arrows.
function drawGraph(tasks, links) {
  const svg = $("#graph");
  const NS = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text != null) n.textContent = text;
    return n;
  };
  const names = tasks.map((t) => t.work_id);
  for (const l of links) if (!names.includes(l.from)) names.unshift(l.from);
  const depth = Object.fromEntries(names.map((n) => [n, 0]));
  for (let pass = 0; pass < names.length; pass++)
    for (const l of links) if (l.from !== l.to) depth[l.to] = Math.max(depth[l.to], depth[l.from] + 1);
  const columns = {};
  for (const n of names) (columns[depth[n]] = columns[depth[n]] || []).push(n);
  const W = 120, H = 34, GX = 60, GY = 20;
  const where = {};
  for (const [col, list] of Object.entries(columns))
    list.forEach((n, row) => { where[n] = { x: 10 + col * (W + GX), y: 10 + row * (H + GY) }; });
  const width = Math.max(2 * W + GX + 20, 20 + Object.keys(columns).length * (W + GX) - GX);
  const height = Math.max(60, 20 + Math.max(1, ...Object.values(columns).map((c) => c.length)) * (H + GY));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const title = node("title", { id: "graph-title" }, names.length
    ? `${names.length} tasks; ${links.length ? links.map((l) => `${l.from} feeds ${l.to}`).join("; ") : "no links"}` : "No tasks");
  const defs = node("defs", {});
  const marker = node("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" });
  marker.append(node("path", { d: "M0,0 L10,5 L0,10 z", fill: "#56606a" }));
  defs.append(marker);
  svg.replaceChildren(title, defs);
  if (!names.length) svg.append(node("text", { x: 10, y: 35, class: "empty" }, "No tasks on the bus"));
  for (const l of links) {
    const a = where[l.from], b = where[l.to];
    if (!a || !b) continue;
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    svg.append(node("path", { class: "edge", d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}`,
      "data-from": l.from, "data-to": l.to }));
  }
  for (const n of names) {
    const g = node("g", { class: "node", "data-id": n, transform: `translate(${where[n].x},${where[n].y})` });
    g.append(node("rect", { width: W, height: H, rx: 6 }), node("text", { x: W / 2, y: H / 2 + 4, "text-anchor": "middle" }, n));
    svg.append(g);
  }
}

// raw StackFlow -------------------------------------------------------------------------------------
function rawLine(text, kind) {
  const log = $("#raw-log");
  log.append(el("span", { className: kind, textContent: text.endsWith("\n") ? text : text + "\n" }));
  log.scrollTop = log.scrollHeight;
}
handlers.raw = (message) => {
  for (const line of message.text.split(/(?<=\n)/)) if (line) rawLine(line, line.includes('"error":{"code":0') ? "in" : "in err");
};
$("#raw-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("#raw-input").value;
  if (!text.trim()) return;
  rawLine("-> " + text.trim(), "out");
  try { send({ type: "raw", text }); } catch (err) { rawLine(err.message, "err"); }
});
$("#raw-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); $("#raw-form").requestSubmit(); }
});
$("#raw-example").addEventListener("change", () => { if ($("#raw-example").value) $("#raw-input").value = $("#raw-example").value; });
$("#raw-clear").addEventListener("click", () => $("#raw-log").replaceChildren());

connect();
