// The grounding page: choose a video and a task, ask the service, draw its answer on the video's
// timeline. Every request goes to the same /v1/ endpoints (and checks) as any client's, with the
// bearer token typed above; an error shows the service's own message.
//
// What a test (tests/integration/test_page.py) reads: body[data-state] (loading, ready, busy,
// answered, error); #timeline[data-task, data-duration, data-request-id]; one .band per window /
// event / evidence span with data-start, data-end (seconds, the API's numbers) and data-score;
// one #saliency rect per VHD clip with data-saliency; #answer; #error.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "timeexpert-token";
const ENDPOINTS = { mr: "v1/moments", vhd: "v1/highlights", dvc: "v1/captions", gqa: "v1/answers" };

const page = {
  source: null,       // {uri, name} of a listed video, or {file} of an upload
  playing: null,      // what the player shows now (a uri or the File)
  blobUrl: null,      // the player's object URL, revoked when replaced
  duration: 0,        // of the answered video, from the API
};

// --- talking to the service ----------------------------------------------------------------------

class ApiError extends Error {}

async function api(path, body) {
  const headers = {};
  const token = $("token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method: "GET", headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(`the service did not answer (${err.message})`);
  }
  if (!response.ok) throw new ApiError(await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  // every error body of the service is {"error": {"type", "message"}, "request_id"}
  let text = `HTTP ${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error) {
      text = `${body.error.message} (${body.error.type}, HTTP ${response.status}`
        + `${body.request_id ? `, request ${body.request_id}` : ""})`;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) text += ": type the server's bearer token at the top right";
  return text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
  if (message) document.body.dataset.state = "error";
}

// --- the model card and the video list ------------------------------------------------------------

async function loadModelCard() {
  const models = await (await api("v1/models")).json();
  const name = models.data[0].id;
  const info = await (await api(`v1/models/${encodeURIComponent(name)}`)).json();
  const facts = [
    ["name", `${info.name} ${info.version}`], ["checkpoint", info.checkpoint],
    ["gating", info.gating], ["layers", info.num_layers],
    ["experts", `${info.max_experts} slots a layer` + (info.ep_size > 1
      ? `, ${info.experts_per_rank} on each of ${info.ep_size} EP ranks` : "")],
    ["frames", `${info.num_frames} at ${info.image_size}x${info.image_size}`],
    ["batch", info.max_batch_size], ["tasks", info.tasks.join(", ")],
  ];
  $("model-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", String(v))]));
  $("experts").replaceChildren(...info.active_experts.map((active, layer) => {
    const row = el("div", "", "layer");
    row.dataset.layer = layer;
    row.append(el("b", `layer ${layer}`));
    for (let e = 0; e < info.max_experts; e++) {
      const cell = el("span", "", active.includes(e) ? "expert on" : "expert");
      cell.title = `expert ${e}${active.includes(e) ? " (active)" : ""}`;
      row.append(cell);
    }
    row.append(el("span", ` ${active.length}/${info.max_experts}`));
    return row;
  }));
}

async function loadVideoList() {
  const listing = await (await api("v1/videos")).json();
  const select = $("video-list");
  const empty = listing.videos.length ? "choose a video" : "none under the allowed roots";
  select.replaceChildren(new Option(empty, ""), ...listing.videos.map((v) => new Option(v.name, v.uri)));
  if (listing.truncated) select.append(new Option("(more not listed: give a path to the API)", ""));
  if (page.source && page.source.uri) select.value = page.source.uri;  // kept across a reload
}

async function loadService() {
  showError("");
  try {
    await Promise.all([loadModelCard(), loadVideoList()]);
    document.body.dataset.state = "ready";
  } catch (err) {
    showError(err.message);
  }
}

// --- the video --------------------------------------------------------------------------------

function chooseListed() {
  const select = $("video-list");
  if (!select.value) return;
  page.source = { uri: select.value, name: select.selectedOptions[0].text };
  $("upload").value = "";
  $("source").textContent = `video: ${page.source.name}`;
  show(page.source).catch((err) => showError(err.message));
}

function chooseUpload() {
  const file = $("upload").files[0];
  if (!file) return;
  page.source = { file };
  $("video-list").value = "";
  $("source").textContent = `upload: ${file.name} (${(file.size / 1048576).toFixed(2)} MB)`;
  show(page.source).catch((err) => showError(err.message));
}

async function show(source) {
  // a listed video's bytes come from /v1/videos/content (the allow-list and the token apply);
  // an upload plays from the browser's own copy
  const key = source.file || source.uri;
  if (page.playing === key) return;
  page.playing = key;
  let blob = source.file;
  try {
    blob = blob || await (await api(`v1/videos/content?uri=${encodeURIComponent(source.uri)}`)).blob();
  } catch (err) {
    page.playing = null;  // try again on the next ask
    throw err;
  }
  if (page.blobUrl) URL.revokeObjectURL(page.blobUrl);
  page.blobUrl = URL.createObjectURL(blob);
  $("player").src = page.blobUrl;
}

function videoField(source) {
  if (source.uri) return Promise.resolve({ uri: source.uri });
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ data_url: reader.result });
    reader.onerror = () => reject(new ApiError(`cannot read ${source.file.name}: ${reader.error}`));
    reader.readAsDataURL(source.file);
  });
}

function seek(seconds) {
  $("player").currentTime = seconds;
  movePlayhead();
}

function movePlayhead() {
  const t = $("player").currentTime;
  $("playhead").style.left = page.duration ? `${Math.min(100, (100 * t) / page.duration)}%` : "0";
  for (const band of document.querySelectorAll(".band")) {
    band.classList.toggle("active", t >= +band.dataset.start && t < +band.dataset.end);
  }
}

// --- asking -----------------------------------------------------------------------------------

function taskChanged() {
  const task = $("task").value;
  $("query-label").hidden = task === "dvc";
  $("options-label").hidden = task !== "gqa";
  $("query-label").firstChild.textContent = task === "gqa" ? "Question " : "Query ";
}

async function ask(event) {
  event.preventDefault();
  showError("");
  if (!page.source) {
    showError("choose a video from the list or upload one first");
    return;
  }
  const task = $("task").value;
  const text = $("query").value.trim();
  $("submit").disabled = true;
  document.body.dataset.state = "busy";
  $("status").textContent = `asking (${task.toUpperCase()}) ...`;
  const started = performance.now();
  try {
    const body = { video: await videoField(page.source) };
    if (task === "mr" || task === "vhd") body.query = text;
    if (task === "gqa") {
      body.question = text;
      body.options = $("options").value.split("\n").map((o) => o.trim()).filter(Boolean);
    }
    show(page.source).catch((err) => showError(err.message));
    const answer = await (await api(ENDPOINTS[task], body)).json();
    draw(answer);
    $("status").textContent = `answered in ${((performance.now() - started) / 1000).toFixed(2)} s: `
      + `${answer.num_frames} frames of a ${answer.duration.toFixed(1)} s video (request ${answer.request_id})`;
    document.body.dataset.state = "answered";
  } catch (err) {
    $("status").textContent = "";
    showError(err.message);
  } finally {
    $("submit").disabled = false;
  }
}

// --- drawing the answer -----------------------------------------------------------------------

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text) node.textContent = text;
  if (className) node.className = className;
  return node;
}

const pct = (seconds) => `${(100 * seconds) / page.duration}%`;
const fmt = (seconds) => `${seconds.toFixed(1)} s`;
const score = (value) => (Math.abs(value) >= 0.01 ? value.toFixed(2) : value.toPrecision(2));

function lanes(spans) {
  // overlapping spans go to separate rows: each span takes the first row free at its start
  const ends = [];
  return spans.map((s) => {
    let lane = ends.findIndex((end) => end <= s.start);
    if (lane < 0) lane = ends.push(0) - 1;
    ends[lane] = s.end;
    return lane;
  });
}

function draw(answer) {
  page.duration = answer.duration;
  const timeline = $("timeline");
  timeline.dataset.task = answer.task;
  timeline.dataset.duration = answer.duration;
  timeline.dataset.requestId = answer.request_id;
  drawAxis();

  let spans = [];  // [{start, end, score, label, kind}]
  let said = "";
  if (answer.task === "mr" || answer.task === "vhd") {
    spans = answer.windows.map((w, i) => ({ ...w, kind: "window",
      label: `#${i + 1}` + (w.score === null ? "" : ` ${score(w.score)}`) }));
    said = spans.length ? `${spans.length} window${spans.length > 1 ? "s" : ""}, best first`
      : "no matching moment";
  } else if (answer.task === "dvc") {
    spans = answer.events.map((e) => ({ ...e, kind: "event", label: e.caption }));
    said = spans.length ? `${spans.length} event${spans.length > 1 ? "s" : ""}` : "no events found";
  } else {
    if (answer.evidence) spans = [{ ...answer.evidence, kind: "evidence", label: "evidence" }];
    said = answer.answer === null ? "Answer: none of the options"
      : `Answer: ${answer.answer} (option ${answer.answer_index + 1})`;
    said += answer.evidence ? `, evidence ${fmt(answer.evidence.start)} to ${fmt(answer.evidence.end)}`
      : ", no evidence span";
  }
  $("answer").textContent = said;
  drawSaliency(answer.task === "vhd" ? answer : null);

  const rows = lanes(spans);
  $("track").style.height = `${34 * Math.max(1, ...rows.map((r) => r + 1))}px`;
  $("track").replaceChildren(...spans.map((s, i) => {
    const band = el("div", s.label, `band ${s.kind}`);
    band.dataset.start = s.start;
    band.dataset.end = s.end;
    if (s.score !== null && s.score !== undefined) band.dataset.score = s.score;
    band.style.left = pct(s.start);
    band.style.width = pct(s.end - s.start);
    band.style.top = `${34 * rows[i]}px`;
    band.title = `${fmt(s.start)} to ${fmt(s.end)}: ${s.label}`;
    band.addEventListener("click", (ev) => { ev.stopPropagation(); seek(s.start); });
    return band;
  }));
  $("results").tBodies[0].replaceChildren(...spans.map((s) => {
    const row = el("tr");
    row.append(el("td", `${fmt(s.start)} to ${fmt(s.end)}`),
      el("td", s.score === null || s.score === undefined ? "" : `score ${score(s.score)}`),
      el("td", s.kind === "event" ? s.label : ""));
    row.addEventListener("click", () => seek(s.start));
    return row;
  }));
  movePlayhead();
}

function drawAxis() {
  const step = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600].find((s) => page.duration / s <= 12) || 1200;
  const ticks = [];
  for (let t = 0; t <= page.duration + 1e-9; t += step) {
    const tick = el("span", `${Number(t.toFixed(1))}s`);
    tick.style.left = pct(t);
    ticks.push(tick);
  }
  $("axis").replaceChildren(...ticks);
}

function drawSaliency(answer) {
  // VHD: one bar per clip of clip_len seconds and the curve through the clip centres, scaled to
  // the highest saliency (viewBox 1000 x 100 over the whole video)
  const svg = $("saliency");
  svg.toggleAttribute("hidden", !answer);  // an SVG element has no `hidden` property
  if (!answer) return svg.replaceChildren();
  const top = Math.max(...answer.saliency, 1e-9);
  const x = (seconds) => (1000 * Math.min(seconds, page.duration)) / page.duration;
  const y = (s) => 100 - (95 * Math.max(s, 0)) / top;
  const ns = "http://www.w3.org/2000/svg";
  const points = [];
  const bars = answer.saliency.map((s, i) => {
    const start = i * answer.clip_len;
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", x(start));
    rect.setAttribute("width", Math.max(0, x(start + answer.clip_len) - x(start) - 1));
    rect.setAttribute("y", y(s));
    rect.setAttribute("height", 100 - y(s));
    rect.dataset.clip = i;
    rect.dataset.saliency = s;
    const title = document.createElementNS(ns, "title");
    title.textContent = `${fmt(start)}: saliency ${score(s)}`;
    rect.append(title);
    points.push(`${x(start + answer.clip_len / 2)},${y(s)}`);
    return rect;
  });
  const curve = document.createElementNS(ns, "polyline");
  curve.setAttribute("points", points.join(" "));
  curve.setAttribute("vector-effect", "non-scaling-stroke");
  svg.replaceChildren(...bars, curve);
}

// --- wiring -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = localStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    loadService();
  });
  $("video-list").addEventListener("change", chooseListed);
  $("upload").addEventListener("change", chooseUpload);
  $("task").addEventListener("change", taskChanged);
  $("ask").addEventListener("submit", ask);
  $("player").addEventListener("timeupdate", movePlayhead);
  $("player").addEventListener("seeked", movePlayhead);
  $("timeline").addEventListener("click", (ev) => {
    if (!page.duration) return;
    const box = $("track").getBoundingClientRect();
    seek(Math.max(0, Math.min(1, (ev.clientX - box.left) / box.width)) * page.duration);
  });
  taskChanged();
  loadService();
});
