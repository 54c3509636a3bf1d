// vidalign annotate: the page's logic. It talks to the server's JSON API only:
//   GET /api/info, GET /api/next?annotator=, POST /api/label, POST /api/undo.
// With access control the link carries ?token=...: the server answers the page with a cookie
// that every later request (API and videos) carries, and the page drops the token from the
// address bar. An invite token names its annotator (/api/info says who): no name to type.
// A label counts once the server has answered 200 (it has been committed to SQLite by then);
// until that answer the buttons stay disabled, and on an error the same pair stays on screen.
"use strict";

const ASPECT_NAMES = {visual_quality: "Visual quality", motion: "Motion", text_alignment: "Text alignment"};
const $ = (id) => document.getElementById(id);
const left = $("video-left");
const right = $("video-right");
let annotator = null;
let pair = null;
let busy = false;
let boundName = null;  // the annotator an invite link names (null: type a name)

function setState(state) {
  document.body.dataset.state = state;
  document.body.dataset.pairId = pair ? String(pair.id) : "";
}

function status(text, isError) {
  $("status").textContent = text || "";
  $("status").classList.toggle("error", !!isError);
}

async function api(method, path, body) {
  const opts = {method, headers: {}};
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = {error: res.statusText}; }
  if (!res.ok) {
    const err = new Error(data && data.error ? data.error : res.statusText);
    err.status = res.status;
    err.reason = data && data.reason ? data.reason : null;  // e.g. "pair_complete", "duplicate"
    throw err;
  }
  return data;
}

// ---------------------------------------------------------------------------------------
// annotator

function showLogin() {
  $("login").hidden = false;
  $("task").hidden = true;
  $("done").hidden = true;
  $("who").hidden = true;
  $("name-input").value = annotator || "";
  $("name-input").focus();
  setState("login");
}

function startAs(name) {
  annotator = name.trim();
  if (!boundName) localStorage.setItem("vidalign.annotator", annotator);
  $("annotator-name").textContent = annotator;
  $("switch").hidden = !!boundName;
  $("who").hidden = false;
  $("login").hidden = true;
  loadNext();
}

// ---------------------------------------------------------------------------------------
// pairs

function showProgress(p) {
  if (!p) return;
  $("progress-box").hidden = false;
  $("progress").textContent = `${p.done} / ${p.total}`;
  $("progress-bar").max = Math.max(1, p.total);
  $("progress-bar").value = p.done;
  $("complete").textContent =
    `(pairs complete: ${p.pairs_complete} / ${p.pairs_total}, ${p.per_pair} label${p.per_pair > 1 ? "s" : ""} each)`;
}

function resetForm() {
  document.querySelectorAll("#aspects input[value='']").forEach((el) => { el.checked = true; });
  $("comment").value = "";
}

function showPair(p) {
  pair = p;
  if (!p) {
    $("task").hidden = true;
    $("done").hidden = false;
    left.removeAttribute("src");
    right.removeAttribute("src");
    setState("done");
    return;
  }
  $("done").hidden = true;
  $("task").hidden = false;
  $("prompt").textContent = p.prompt;
  left.src = p.left.url;
  right.src = p.right.url;
  resetForm();
  playBoth();
  setState("ready");
}

async function loadNext() {
  setState("busy");
  try {
    const data = await api("GET", `/api/next?annotator=${encodeURIComponent(annotator)}`);
    showProgress(data.progress);
    showPair(data.pair);
  } catch (e) {
    status(`Could not load the next pair: ${e.message}`, true);
    setState(pair ? "ready" : "error");
  }
}

function aspectChoices() {
  const out = {};
  for (const name of Object.keys(ASPECT_NAMES)) {
    const el = document.querySelector(`#aspects input[name='${name}']:checked`);
    if (el && el.value) out[name] = el.value;
  }
  return out;
}

async function submit(choice) {
  if (busy || !pair) return;
  busy = true;
  setButtons(false);
  setState("busy");
  const body = {annotator, pair_id: pair.id, choice, aspects: aspectChoices(), comment: $("comment").value};
  try {
    const data = await api("POST", "/api/label", body);
    showProgress(data.progress);
    status(choice === "skip" ? "Skipped." : "Saved.");
    await loadNext();
  } catch (e) {
    if (e.status === 409) {  // already labelled (e.g. in another tab), or the pair filled up: move on
      status(e.reason === "pair_complete" ?
        "Not recorded: other annotators gave this pair all the labels it needs while you were " +
        "looking at it. Here is the next pair." : e.message);
      await loadNext();
    } else {
      status(`Not saved: ${e.message}`, true);
      setState("ready");
    }
  } finally {
    busy = false;
    setButtons(true);
  }
}

async function undo() {
  if (busy || !annotator) return;
  busy = true;
  setButtons(false);
  setState("busy");
  try {
    const data = await api("POST", "/api/undo", {annotator});
    showProgress(data.progress);
    showPair(data.pair);
    status("Undone: label the pair again.");
  } catch (e) {
    status(e.status === 409 ? "Nothing to undo." : `Undo failed: ${e.message}`, e.status !== 409);
    setState(pair ? "ready" : "done");
  } finally {
    busy = false;
    setButtons(true);
  }
}

function setButtons(enabled) {
  document.querySelectorAll(".choices button").forEach((b) => { b.disabled = !enabled; });
}

// ---------------------------------------------------------------------------------------
// synchronised playback: the left video leads, the right one follows it

function playBoth() {
  left.play().catch(() => {});
  right.play().catch(() => {});
  $("play").firstChild.textContent = "Pause ";
}

function pauseBoth() {
  left.pause();
  right.pause();
  right.currentTime = Math.min(left.currentTime, right.duration || 0);
  $("play").firstChild.textContent = "Play ";
}

function togglePlay() {
  if (left.paused) playBoth(); else pauseBoth();
}

function restart() {
  left.currentTime = 0;
  right.currentTime = 0;
  playBoth();
}

function follow() {
  if (left.duration && right.duration) {
    if (Math.abs(left.currentTime - right.currentTime) > 0.1 && left.currentTime < right.duration) {
      right.currentTime = left.currentTime;
    }
    if (!left.paused && right.paused) right.play().catch(() => {});
    if (document.activeElement !== $("seek")) $("seek").value = left.currentTime / left.duration;
  }
  requestAnimationFrame(follow);
}

$("seek").addEventListener("input", () => {
  if (!left.duration) return;
  left.currentTime = $("seek").value * left.duration;
  right.currentTime = Math.min(left.currentTime, right.duration || 0);
});

// ---------------------------------------------------------------------------------------
// wiring

function buildAspects() {
  const body = document.querySelector("#aspects tbody");
  for (const [name, title] of Object.entries(ASPECT_NAMES)) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<th scope="row">${title}</th>`;
    for (const value of ["left", "tie", "right", ""]) {
      const td = document.createElement("td");
      const input = document.createElement("input");
      Object.assign(input, {type: "radio", name, value, id: `aspect-${name}-${value || "none"}`});
      input.checked = value === "";
      input.setAttribute("aria-label", `${title}: ${value || "no answer"}`);
      td.appendChild(input);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

const KEYS = {
  a: "left", arrowleft: "left", 1: "left",
  b: "right", arrowright: "right", 2: "right",
  t: "tie", arrowdown: "tie", 3: "tie",
  s: "skip",
};

document.addEventListener("keydown", (ev) => {
  const tag = (ev.target.tagName || "").toLowerCase();
  if (tag === "textarea" || (tag === "input" && ev.target.type !== "radio" && ev.target.type !== "range")) return;
  if (ev.ctrlKey || ev.metaKey || ev.altKey || !annotator || $("login").hidden === false) return;
  const key = ev.key.toLowerCase();
  if (KEYS[key] && pair) {
    ev.preventDefault();
    submit(KEYS[key]);
  } else if (key === "u" || key === "backspace") {
    ev.preventDefault();
    undo();
  } else if (key === " " && pair) {
    ev.preventDefault();
    togglePlay();
  } else if (key === "r" && pair) {
    ev.preventDefault();
    restart();
  }
});

// a clicked button gives up the focus, so that Space or Enter afterwards cannot click it again
const clicked = (fn) => (ev) => { ev.currentTarget.blur(); fn(); };
document.querySelectorAll(".choices button[data-choice]").forEach((b) => {
  b.addEventListener("click", clicked(() => submit(b.dataset.choice)));
});
$("undo").addEventListener("click", clicked(undo));
$("undo-done").addEventListener("click", clicked(undo));
$("play").addEventListener("click", clicked(togglePlay));
$("restart").addEventListener("click", clicked(restart));
$("switch").addEventListener("click", showLogin);
$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if ($("name-input").value.trim()) startAs($("name-input").value);
});

async function init() {
  const params = new URLSearchParams(location.search);
  try {
    const info = await api("GET", "/api/info");
    boundName = info.annotator || null;
  } catch (e) {
    status(e.status === 401 ? "This app needs an invite link: open the link you were sent." :
      `Could not reach the server: ${e.message}`, true);
    setState("error");
    return;
  }
  if (params.has("token")) {  // the cookie carries it from now on; keep it out of the address bar
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.toString() ? `?${params}` : ""));
  }
  const saved = boundName || params.get("annotator") || localStorage.getItem("vidalign.annotator");
  if (saved && saved.trim()) startAs(saved); else showLogin();
}

buildAspects();
requestAnimationFrame(follow);
init();
