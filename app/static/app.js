// MiniVault playground: a chat over WS /ws/generate, conversations and history over the REST API.
// Every text from the user or the model goes into the page as textContent, never as markup.
"use strict";

const KEY_STORAGE = "minivault.apiKey";
const byId = (id) => document.getElementById(id);
const ui = {
  menu: byId("menu"), side: byId("side"), model: byId("model"), notice: byId("notice"),
  keyForm: byId("key-form"), keyReason: byId("key-reason"), key: byId("key"),
  chats: byId("chats"), chatsEmpty: byId("chats-empty"), newChat: byId("new-chat"),
  historyForm: byId("history-form"), historyQ: byId("history-q"), historyStatus: byId("history-status"),
  history: byId("history"), transcript: byId("transcript"), empty: byId("empty"),
  compose: byId("compose"), prompt: byId("prompt"), system: byId("system"),
  settingsToggle: byId("settings-toggle"), settings: byId("settings"),
  temperature: byId("temperature"), maxTokens: byId("max-tokens"),
  state: byId("state"), stop: byId("stop"), send: byId("send"),
};

let apiKey = localStorage.getItem(KEY_STORAGE) || "";
let conversationId = null;
let conversationsOff = false; // MINIVAULT_LOG_PROMPTS=false: the server keeps no conversations
let socket = null;
let turn = null; // the exchange streaming now, at most one per connection

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(error) {
  if (error.code === "unauthorized" && !ui.keyForm.hidden) return; // the key form says it already
  ui.notice.replaceChildren(el("strong", "code", error.code), document.createTextNode(" " + error.message));
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
  ui.notice.replaceChildren();
}

async function api(path, method = "GET") {
  const headers = apiKey ? { "X-API-Key": apiKey } : {};
  let response;
  try {
    response = await fetch(path, { method, headers });
  } catch (exc) {
    throw new ApiError(0, "unreachable", `MiniVault did not answer ${method} ${path} (${exc.message}): is it running?`);
  }
  if (response.status === 204) return null;
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body && body.error;
    const failure = new ApiError(
      response.status,
      (error && error.code) || `http_${response.status}`,
      (error && error.message) || `${method} ${path} answered ${response.status} ${response.statusText}`,
    );
    if (response.status === 401) askForKey(failure.message);
    throw failure;
  }
  return body;
}

// --- API key -------------------------------------------------------------------------------------

function askForKey(reason) {
  ui.keyReason.textContent = reason;
  ui.key.value = apiKey;
  if (ui.keyForm.hidden) {
    ui.keyForm.hidden = false;
    ui.key.focus();
  }
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = ui.key.value.trim();
  if (apiKey) localStorage.setItem(KEY_STORAGE, apiKey);
  else localStorage.removeItem(KEY_STORAGE);
  ui.keyForm.hidden = true;
  if (socket) socket.close(1000); // the next prompt reconnects with the new key
  load();
});

// --- Models, conversations, history --------------------------------------------------------------

async function loadModels() {
  const body = await api("/models");
  const names = body.models.map((model) => model.name);
  if (body.default && !names.includes(body.default)) names.unshift(body.default);
  const chosen = ui.model.value;
  ui.model.replaceChildren(...names.map((name) => new Option(name, name)));
  ui.model.value = names.includes(chosen) ? chosen : body.default || names[0] || "";
}

async function refreshChats() {
  if (conversationsOff) return;
  let page;
  try {
    page = await api("/conversations?limit=50");
  } catch (error) {
    if (error.status === 422) {
      conversationsOff = true;
      ui.chatsEmpty.textContent = error.message;
    } else {
      showError(error);
    }
    return;
  }
  ui.chats.replaceChildren(...page.items.map(chatItem));
  ui.chatsEmpty.hidden = page.items.length > 0;
}

function chatItem(conversation) {
  const item = el("li", "chat-item");
  item.dataset.id = conversation.id;
  const title = conversation.title || "(no answer yet)";
  const pick = el("button", "pick", title);
  pick.type = "button";
  if (conversation.id === conversationId) pick.setAttribute("aria-current", "true");
  pick.addEventListener("click", () => openConversation(conversation.id));
  const remove = el("button", "delete icon", "\u00d7");
  remove.type = "button";
  remove.title = "Delete";
  remove.setAttribute("aria-label", `Delete conversation: ${title}`);
  remove.addEventListener("click", () => deleteConversation(conversation.id));
  item.append(pick, remove);
  return item;
}

async function openConversation(id) {
  if (turn) return;
  let conversation;
  try {
    const path = `/conversations/${encodeURIComponent(id)}?limit=500`;
    conversation = await api(path);
    // Turns come a page at a time: follow next_cursor to the last page.
    while (conversation.next_cursor) {
      const next = await api(`${path}&cursor=${encodeURIComponent(conversation.next_cursor)}`);
      next.turns = conversation.turns.concat(next.turns);
      conversation = next;
    }
  } catch (error) {
    showError(error);
    return;
  }
  hideNotice();
  conversationId = conversation.id;
  clearTranscript();
  for (const past of conversation.turns) {
    const shown = new Turn(past.prompt);
    shown.setText(past.response);
    shown.answer.dataset.id = past.exchange_id;
    shown.answer.dataset.state = "done";
    shown.meta.replaceChildren(el("span", "when", new Date(past.ts).toLocaleString()));
  }
  markCurrentChat();
  closeMenu();
  ui.prompt.focus();
}

async function deleteConversation(id) {
  try {
    await api(`/conversations/${encodeURIComponent(id)}`, "DELETE");
  } catch (error) {
    showError(error);
    return;
  }
  if (id === conversationId && !turn) newChat();
  await refreshChats();
}

function markCurrentChat() {
  for (const item of ui.chats.children) {
    const pick = item.querySelector(".pick");
    if (item.dataset.id === conversationId) pick.setAttribute("aria-current", "true");
    else pick.removeAttribute("aria-current");
  }
}

function newChat() {
  if (turn) return;
  conversationId = null;
  clearTranscript();
  markCurrentChat();
  closeMenu();
  ui.prompt.focus();
}

let historyAsked = 0;

async function refreshHistory() {
  const asked = ++historyAsked;
  const q = ui.historyQ.value.trim();
  const params = new URLSearchParams({ limit: "20" });
  if (q) params.set("q", q);
  let page;
  try {
    page = await api(`/history?${params}`);
  } catch (error) {
    page = error;
  }
  if (asked !== historyAsked) return; // a later search (or refresh) answers instead
  if (page instanceof ApiError) {
    ui.historyStatus.textContent = page.message;
    ui.history.replaceChildren();
    return;
  }
  const count = page.items.length;
  if (q) ui.historyStatus.textContent = count ? `Best matches for \u201c${q}\u201d` : `Nothing matches \u201c${q}\u201d`;
  else ui.historyStatus.textContent = count ? "Latest exchanges" : "No exchanges yet";
  ui.history.replaceChildren(...page.items.map(historyItem));
}

function historyItem(record) {
  const item = el("li");
  const button = el("button", "exchange");
  button.type = "button";
  button.dataset.id = record.id;
  button.title = "Put this prompt in the message box";
  button.append(
    el("span", "q", record.prompt ?? "(prompt not stored)"),
    el("span", "a", record.error ? record.error.message : record.response ?? "(answer not stored)"),
    el("span", "when", `${new Date(record.ts).toLocaleString()} \u00b7 ${record.model ?? ""} \u00b7 ${record.status}`),
  );
  if (record.prompt != null) {
    button.addEventListener("click", () => {
      ui.prompt.value = record.prompt;
      closeMenu();
      ui.prompt.focus();
    });
  }
  item.append(button);
  return item;
}

ui.historyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  refreshHistory();
});
ui.newChat.addEventListener("click", newChat);

// --- The chat ------------------------------------------------------------------------------------

class Turn {
  constructor(prompt) {
    ui.empty.hidden = true;
    this.sentAt = performance.now();
    this.firstAt = null;
    this.count = 0;
    this.ended = false;
    const article = el("article", "turn");
    this.answer = el("div", "bubble answer");
    this.answer.dataset.state = "waiting";
    this.text = el("div", "text");
    this.status = el("p", "status");
    this.meta = el("p", "meta");
    this.answer.append(this.text, this.status, this.meta);
    article.append(el("div", "bubble prompt", prompt), this.answer);
    const follow = nearBottom();
    ui.transcript.append(article);
    if (follow) scrollDown();
  }

  setText(text) {
    this.text.textContent = text;
  }

  started(frame) {
    this.answer.dataset.id = frame.id;
    this.answer.dataset.state = "streaming";
    setState(`${frame.model}: waiting for the first token\u2026`);
  }

  queued(position) {
    this.answer.dataset.state = "queued";
    this.status.textContent = `Queued: position ${position}`;
    setState(`Waiting for a free slot (position ${position})`);
  }

  token(content) {
    const follow = nearBottom();
    if (this.firstAt === null) {
      this.firstAt = performance.now();
      this.answer.dataset.state = "streaming";
      this.status.textContent = "";
      setState("Streaming\u2026");
    }
    this.count += 1;
    this.text.append(content); // a text node: markup in a token stays text
    if (follow) scrollDown();
  }

  done(frame) {
    this.ended = true;
    if (typeof frame.response === "string" && frame.response !== this.text.textContent) this.setText(frame.response);
    const cancelled = frame.done_reason === "cancelled";
    this.answer.dataset.state = cancelled ? "cancelled" : "done";
    this.status.textContent = cancelled ? "Stopped." : "";
    const timings = frame.timings || {};
    const usage = frame.usage || {};
    const total = timings.total_ms ?? performance.now() - this.sentAt;
    const ttft = timings.ttft_ms ?? (this.firstAt === null ? null : this.firstAt - this.sentAt);
    const tokens = usage.completion_tokens ?? this.count;
    const parts = [el("span", "model", frame.model)];
    if (ttft !== null) {
      parts.push(el("span", "ttft", `first token ${ttft.toFixed(0)} ms`));
      // The pace of generation itself: the tokens after the first, over the time after it.
      const rate = tokens > 1 && total > ttft ? ((tokens - 1) * 1000) / (total - ttft) : (tokens * 1000) / total;
      parts.push(el("span", "rate", `${rate.toFixed(1)} tokens/s`));
    }
    parts.push(el("span", "tokens", `${tokens} tokens`));
    if (frame.done_reason === "length") parts.push(el("span", "cut", "cut at the token limit"));
    if (timings.queue_ms) parts.push(el("span", "queue", `queued ${timings.queue_ms.toFixed(0)} ms`));
    this.meta.replaceChildren(...parts.flatMap((part, index) => (index ? [" \u00b7 ", part] : [part])));
  }

  fail(code, message) {
    if (this.ended) return;
    this.ended = true;
    this.answer.dataset.state = "error";
    this.status.replaceChildren(el("strong", "code", code), document.createTextNode(" " + message));
  }
}

function setState(text) {
  ui.state.textContent = text;
}

function nearBottom() {
  const box = scrollBox();
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollDown() {
  const box = scrollBox();
  box.scrollTop = box.scrollHeight;
}

function scrollBox() {
  // Wide screens scroll the transcript; phones scroll the whole page.
  return ui.transcript.scrollHeight > ui.transcript.clientHeight ? ui.transcript : document.scrollingElement;
}

function clearTranscript() {
  ui.transcript.replaceChildren(ui.empty);
  ui.empty.hidden = false;
}

function setRunning(running) {
  ui.send.disabled = running;
  ui.stop.disabled = !running;
  ui.newChat.disabled = running;
  if (!running) setState("");
}

function socketUrl() {
  const url = new URL("/ws/generate", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey) url.searchParams.set("api_key", apiKey); // browsers cannot set headers on a websocket
  return url.href;
}

function connect() {
  if (socket && socket.readyState === WebSocket.OPEN) return Promise.resolve(socket);
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(socketUrl());
    socket = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      resolve(ws);
    };
    ws.onmessage = (event) => onFrame(JSON.parse(event.data));
    ws.onclose = (event) => {
      if (socket === ws) socket = null;
      if (opened) onClose(event);
      else reject(new ApiError(0, "unreachable", `could not open ${ws.url.split("?")[0]}: is MiniVault running?`));
    };
  });
}

function onFrame(frame) {
  if (frame.type === "error") {
    if (frame.code === "unauthorized") askForKey(frame.message);
    if (turn) {
      turn.fail(frame.code, frame.message);
      finish();
    } else {
      showError(frame);
    }
    return;
  }
  if (!turn) return;
  if (frame.type === "start") turn.started(frame);
  else if (frame.type === "queued") turn.queued(frame.position);
  else if (frame.type === "token") turn.token(frame.content);
  else if (frame.type === "done") {
    turn.done(frame);
    finish();
  }
}

function onClose(event) {
  if (event.code === 1008 && ui.keyForm.hidden) askForKey(event.reason ? `The server refused the key (${event.reason}).` : "An API key is needed.");
  if (turn) {
    const why = event.reason ? `: ${event.reason}` : "";
    turn.fail("connection_closed", `The connection to MiniVault closed (code ${event.code}${why}).`);
    finish();
  }
}

function finish() {
  turn = null;
  setRunning(false);
  if (conversationId) refreshChats();
  refreshHistory();
}

function generateFrame(prompt) {
  const frame = { prompt };
  if (ui.model.value) frame.model = ui.model.value;
  if (ui.system.value.trim()) frame.system = ui.system.value;
  const options = {};
  if (ui.temperature.value !== "") options.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value !== "") options.num_predict = Number.parseInt(ui.maxTokens.value, 10);
  if (Object.keys(options).length) frame.options = options;
  if (conversationId) frame.conversation_id = conversationId;
  return frame;
}

async function send() {
  const prompt = ui.prompt.value;
  if (turn || ui.send.disabled || !prompt.trim()) return; // disabled: still creating the conversation
  hideNotice();
  setRunning(true);
  setState("Connecting\u2026");
  if (conversationId === null && !conversationsOff) {
    try {
      conversationId = (await api("/conversations", "POST")).id;
    } catch (error) {
      if (error.status === 422) {
        conversationsOff = true; // still answer, just without memory
      } else {
        showError(error);
        setRunning(false);
        return;
      }
    }
  }
  turn = new Turn(prompt);
  ui.prompt.value = "";
  try {
    const ws = await connect();
    ws.send(JSON.stringify(generateFrame(prompt)));
    setState("Sent\u2026");
  } catch (error) {
    if (turn) {
      turn.fail(error.code, error.message);
      finish();
    }
  }
}

ui.compose.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});

ui.stop.addEventListener("click", () => {
  if (turn && socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "cancel" }));
    ui.stop.disabled = true;
    setState("Stopping\u2026");
  }
});

ui.settingsToggle.addEventListener("click", () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.settingsToggle.setAttribute("aria-expanded", String(!ui.settings.hidden));
});

// --- Phones: the side panel folds away -----------------------------------------------------------

function closeMenu() {
  ui.side.classList.remove("open");
  ui.menu.setAttribute("aria-expanded", "false");
}

ui.menu.addEventListener("click", () => {
  const open = ui.side.classList.toggle("open");
  ui.menu.setAttribute("aria-expanded", String(open));
});

// --- Start -----------------------------------------------------------------------------------------

async function load() {
  hideNotice();
  try {
    await loadModels();
    await Promise.all([refreshChats(), refreshHistory()]);
  } catch (error) {
    showError(error);
    // Without a key nothing else would work; without the upstream, the stored conversations and history still do.
    if (error.status !== 401) await Promise.all([refreshChats(), refreshHistory()]);
  }
  document.body.dataset.ready = "true";
}

load();
