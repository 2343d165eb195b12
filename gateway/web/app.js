// The sumstream page: sign in with an API key (this tab only), submit a document, follow its
// summary with EventSource (a stream token in the URL: EventSource cannot send Authorization),
// stop it on the server, and resume after any drop from the last seq rendered, so the text has
// no gap and no repeat (docs/architecture.md, "The web app and WebSocket API").
"use strict";

(function () {
  const KEY = "sumstream.key";
  const CURRENT = "sumstream.current";
  const $ = (id) => document.getElementById(id);

  // What the page shows, and what the browser tests read (window.sumstreamPage).
  const state = {
    requestId: null,
    text: "",
    lastSeq: 0,
    status: "idle",
    done: null,
    ttftMs: null,
    submittedAt: null,
    source: null,
    reconnects: 0,
    retryTimer: null,
    renderQueued: false,
  };
  window.sumstreamPage = state;

  function apiKey() { return sessionStorage.getItem(KEY); }

  async function api(method, path, body, headers) {
    const init = { method, headers: { Authorization: "Bearer " + apiKey(), ...(headers || {}) } };
    if (body !== undefined) init.body = body;
    return fetch(path, init);
  }

  async function problemText(response) {
    try {
      const p = await response.json();
      return p.detail || p.title || `HTTP ${response.status}`;
    } catch (_) {
      return `HTTP ${response.status}`;
    }
  }

  function setStatus(text) { $("status").textContent = text; }

  // -- signing in -----------------------------------------------------------------------------

  async function signIn(key) {
    sessionStorage.setItem(KEY, key);
    const r = await api("GET", "/v1/usage");
    if (r.status === 401) {
      sessionStorage.removeItem(KEY);
      $("sign-in-error").textContent = "That API key is not known.";
      return false;
    }
    showApp();
    showUsage(r.ok ? await r.json() : null);
    refreshRecent();
    return true;
  }

  function showApp() {
    $("sign-in").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
  }

  function signOut() {
    closeSource();
    sessionStorage.clear();
    location.reload();
  }

  function usd(x) {
    if (x >= 100) return "$" + Math.round(x).toLocaleString("en-US");
    return "$" + x.toFixed(x < 0.01 ? 6 : 4);
  }
  function plural(n, word) { return `${n.toLocaleString("en-US")} ${word}${n === 1 ? "" : "s"}`; }

  function showUsage(u) {
    if (!u) { $("usage").textContent = ""; return; }
    const budget = u.budget_micro_usd / 1e6;
    $("usage").textContent =
      `${u.user} (${u.tier}) this month: ${plural(u.requests, "request")}, ${plural(u.tokens, "token")}, ` +
      `${usd(u.cost_usd)} of ${usd(budget)} budget`;
  }

  async function refreshUsage() {
    const r = await api("GET", "/v1/usage");
    if (r.ok) showUsage(await r.json());
  }

  async function refreshRecent() {
    const r = await api("GET", "/v1/summaries?limit=10");
    if (!r.ok) return;
    const list = $("recent");
    list.replaceChildren();
    for (const item of (await r.json()).items) {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      open.textContent = item.id;
      open.setAttribute("aria-label", `Reopen request ${item.id}`);
      open.addEventListener("click", () => reopen(item.id));
      const when = document.createElement("span");
      when.className = "state";
      when.textContent = `${new Date(item.created_at).toLocaleTimeString()} ${item.status === "unknown" ? "" : item.status.toLowerCase()}`;
      li.append(open, when);
      list.append(li);
    }
  }

  // -- the document ---------------------------------------------------------------------------

  async function readFile(file) {
    setStatus(`Reading ${file.name}…`);
    const r = await api(
      "POST", `/v1/documents/text?name=${encodeURIComponent(file.name)}`, file,
      { "Content-Type": file.type || "application/octet-stream" },
    );
    if (!r.ok) {
      const why = r.status === 413 ? "the file is too large" : await problemText(r);
      setStatus(`Could not read ${file.name}: ${why}`);
      return;
    }
    const doc = await r.json();
    $("document").value = doc.text;
    const pages = doc.pages ? `, ${doc.pages} page(s)` : "";
    setStatus(`Read ${file.name} (${doc.chars} characters${pages}). Press Summarize.`);
  }

  // -- submitting, with the wait a 429/503 asks for --------------------------------------------

  async function submit(documentText) {
    clearTimeout(state.retryTimer);
    // Set before the first await: whoever waits for "done" never sees the previous request's.
    state.status = "submitting";
    state.submittedAt = performance.now();
    const body = JSON.stringify({ document: documentText });
    const r = await api("POST", "/v1/summaries", body, {
      "Content-Type": "application/json", Accept: "application/json",
    });
    if (r.status === 429 || r.status === 503) {
      const wait = Number(r.headers.get("Retry-After") || "1");
      const why = (r.status === 429 ? "Rate limited: " : "Busy: ") + await problemText(r);
      countdown(wait, why, () => submit(documentText));
      return;
    }
    if (!r.ok) { setStatus(`Not accepted: ${await problemText(r)}`); return; }
    const accepted = await r.json();
    start(accepted.id);
    const wait = accepted.estimated_wait_s > 1 ? ` (about ${Math.round(accepted.estimated_wait_s)} s in the queue)` : "";
    setStatus(`Accepted${wait}.`);
    follow(0);
  }

  function countdown(seconds, why, then) {
    let left = Math.max(1, Math.ceil(seconds));
    state.status = "waiting";
    const tick = () => {
      if (left <= 0) { setStatus("Retrying…"); then(); return; }
      setStatus(`${why}. Retrying in ${left} s…`);
      left -= 1;
      state.retryTimer = setTimeout(tick, 1000);
    };
    tick();
  }

  function start(requestId) {
    closeSource();
    Object.assign(state, {
      requestId, text: "", lastSeq: 0, status: "streaming", done: null, ttftMs: null, reconnects: 0,
    });
    sessionStorage.setItem(CURRENT, requestId);
    $("summary").replaceChildren();
    $("request-stats").textContent = "";
    $("stop").disabled = false;
    render();
  }

  // -- following the stream -------------------------------------------------------------------

  function closeSource() {
    if (state.source) { state.source.close(); state.source = null; }
  }

  // Opens EventSource from state.lastSeq. EventSource's own reconnects send Last-Event-ID
  // (the last token id it saw, which the page has rendered); a reconnect the page makes itself
  // (token expired, gateway restarted, back online) passes last_event_id explicitly.
  async function follow(attempt) {
    const requestId = state.requestId;
    closeSource();
    let r;
    try {
      r = await api("POST", `/v1/summaries/${encodeURIComponent(requestId)}/stream-token`);
    } catch (_) {
      return retryFollow(attempt);
    }
    if (requestId !== state.requestId) return;
    if (!r.ok) {
      if (r.status >= 500) return retryFollow(attempt);
      setStatus(`Cannot follow the request: ${await problemText(r)}`);
      return;
    }
    const token = (await r.json()).token;
    const url = `/v1/summaries/${encodeURIComponent(requestId)}/events?token=${encodeURIComponent(token)}&last_event_id=${state.lastSeq}`;
    const source = new EventSource(url);
    state.source = source;
    source.addEventListener("open", () => { if (state.status === "reconnecting") setStatus("Streaming…"); });
    source.addEventListener("token", (e) => onToken(JSON.parse(e.data)));
    source.addEventListener("progress", (e) => onProgress(JSON.parse(e.data)));
    source.addEventListener("done", (e) => onDone(JSON.parse(e.data)));
    source.addEventListener("error", (e) => {
      if (source !== state.source) return;
      if (e instanceof MessageEvent && e.data) { onServerError(JSON.parse(e.data)); return; }
      // The connection failed. EventSource retries by itself while CONNECTING; once CLOSED
      // (an HTTP error, an expired token, offline) the page reconnects itself.
      state.status = "reconnecting";
      setStatus("Connection lost; reconnecting…");
      if (source.readyState === EventSource.CLOSED) retryFollow(attempt);
    });
  }

  function retryFollow(attempt) {
    if (state.status === "done") return;
    state.reconnects += 1;
    const delay = Math.min(5000, 250 * 2 ** Math.min(attempt, 5));
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(() => follow(attempt + 1), navigator.onLine ? delay : 60000);
  }

  function onProgress(data) {
    // A long document's plan, then its parts as they are summarized (before any token).
    if (state.status === "streaming" || state.status === "done") return;
    const usd = (micro) => `$${(micro / 1e6).toFixed(4)}`;
    if (data.stage === "plan") {
      setStatus(`Long document: ${data.chunks} parts, ${data.calls} calls, about ` +
        `${Math.round(data.estimated_seconds)} s and ${usd(data.estimated_cost_micro_usd)}.`);
    } else {
      const missing = data.missing_sections.length ? `; parts ${data.missing_sections.join(", ")} failed` : "";
      setStatus(`Summarized ${data.done} of ${data.total} parts so far (${usd(data.cost_micro_usd)})${missing}.`);
    }
  }

  function onToken(data) {
    // A token at or below the last seq rendered was rendered already: never twice.
    if (data.seq <= state.lastSeq) return;
    if (state.ttftMs === null && state.submittedAt !== null) {
      state.ttftMs = performance.now() - state.submittedAt;
    }
    state.lastSeq = data.seq;
    state.text += data.text;
    state.status = "streaming";
    scheduleRender();
  }

  function onServerError(data) {
    // error + done ends a request that did not complete; an error without a done (slow
    // client, gateway shutting down) is followed by EventSource's own reconnect.
    if (data.code === "cancelled") setStatus("Stopped.");
    else setStatus(`${data.message}`);
  }

  function onDone(done) {
    if (done.status === "running") {
      // The stream reached its longest life; the request goes on: follow it again.
      follow(0);
      return;
    }
    closeSource();
    state.done = done;
    state.status = "done";
    sessionStorage.removeItem(CURRENT);
    $("stop").disabled = true;
    render();
    const u = done.usage;
    $("request-stats").textContent =
      `${done.status.toLowerCase()}: ${u.input_tokens} input + ${u.output_tokens} output tokens, ` +
      `${usd(done.cost.usd)}` + (state.ttftMs !== null ? `, first token after ${Math.round(state.ttftMs)} ms` : "");
    if (done.status === "COMPLETED") setStatus("Done.");
    // The ledger settles a result about a second after it is written: ask again then.
    refreshUsage();
    setTimeout(refreshUsage, 1500);
    refreshRecent();
  }

  function scheduleRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(render);
  }

  function render() {
    state.renderQueued = false;
    const el = $("summary");
    el.innerHTML = window.renderMarkdown(state.text.trim());
    el.dataset.renderedSeq = String(state.lastSeq);
    el.dataset.status = state.status;
    el.setAttribute("aria-busy", state.status === "streaming" ? "true" : "false");
  }

  async function stop() {
    if (!state.requestId || state.status === "done") return;
    $("stop").disabled = true;
    setStatus("Stopping…");
    const r = await api("DELETE", `/v1/summaries/${encodeURIComponent(state.requestId)}`);
    if (!r.ok && r.status !== 404) { $("stop").disabled = false; setStatus(`Could not stop: ${await problemText(r)}`); }
  }

  function reopen(requestId) {
    start(requestId);
    state.submittedAt = null;
    setStatus(`Reopened ${requestId}.`);
    follow(0);
    $("summary").focus();
  }

  // -- wiring ---------------------------------------------------------------------------------

  function wire() {
    $("sign-in-form").addEventListener("submit", (e) => {
      e.preventDefault();
      signIn($("api-key").value.trim());
    });
    $("sign-out").addEventListener("click", signOut);
    $("submit-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("document").value;
      if (!text.trim()) { setStatus("Paste some text or drop a file first."); return; }
      submit(text);
    });
    $("stop").addEventListener("click", stop);
    $("file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
    const zone = $("drop-zone");
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]);
    });
    // Offline (a tunnel, a dropped Wi-Fi): an open stream may stall without any error, so the
    // page lets it go and resumes from the last rendered seq once the browser is back online.
    window.addEventListener("offline", () => {
      if (!state.requestId || state.status === "done") return;
      closeSource();
      clearTimeout(state.retryTimer);
      state.status = "reconnecting";
      setStatus("Offline; the summary resumes when the connection is back.");
    });
    window.addEventListener("online", () => {
      if (state.requestId && state.status !== "done") { clearTimeout(state.retryTimer); follow(0); }
    });
  }

  async function boot() {
    wire();
    if (!apiKey()) { $("api-key").focus(); return; }
    if (!(await signIn(apiKey()))) return;
    // A reload mid-stream reattaches: the whole text again from the log, then live.
    const current = sessionStorage.getItem(CURRENT);
    if (current) reopen(current);
  }

  boot();
})();
