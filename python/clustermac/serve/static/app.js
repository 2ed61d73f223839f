// The clustermac search page: pick a query (upload or database), draw its box, search, inspect.
// Plain DOM code, no framework, nothing loaded from elsewhere. Names and messages are always set
// with textContent (never innerHTML), so a file name can never become markup.
"use strict";

const PAGE_SIZE = 24;
const $ = (id) => document.getElementById(id);

const state = {
  query: null, // {file} for an upload or {name} for a database image
  image: null, // the decoded query image (EXIF rotation applied by the browser)
  box: null, // [x1, y1, x2, y2] in the query image's pixels, or null for the whole image
  scale: 1, // canvas pixels per image pixel
  offset: 0,
  total: 0,
  queryClusters: null,
};

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function fetchJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = { error: `HTTP ${response.status}` };
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function imageURL(name, size) {
  const path = name.split("/").map(encodeURIComponent).join("/");
  return `/api/images/${path}` + (size ? `?size=${size}` : "");
}

function figure(name, src, captionParts, onClick) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = name;
  img.loading = "lazy";
  const caption = document.createElement("figcaption");
  for (const [cls, text] of captionParts) {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    caption.appendChild(span);
  }
  fig.title = name;
  fig.append(img, caption);
  fig.addEventListener("click", onClick);
  return fig;
}

// ---------------------------------------------------------------- the index
async function loadInfo() {
  try {
    const info = await fetchJSON("/api/info");
    $("about").textContent = `${info.images} images · ${info.method} · ${info.backbone}`;
    $("rerank").disabled = !info.rerank;
    $("rerank").parentElement.title = info.rerank ? "AML re-ranking of the top results" : "this index has no feature-map store";
    $("k").max = info.max_k;
  } catch (error) {
    $("about").textContent = `cannot reach the index: ${error.message}`;
  }
}

// ---------------------------------------------------------------- picking the query
function showTab(which) {
  $("upload-pane").hidden = which !== "upload";
  $("browse-pane").hidden = which !== "browse";
  $("tab-upload").classList.toggle("active", which === "upload");
  $("tab-browse").classList.toggle("active", which === "browse");
  if (which === "browse" && !$("browse-grid").childElementCount) browse(0);
}

async function browse(offset) {
  const prefix = $("prefix").value;
  try {
    const page = await fetchJSON(`/api/images?offset=${offset}&limit=${PAGE_SIZE}&prefix=${encodeURIComponent(prefix)}`);
    state.offset = page.offset;
    state.total = page.total;
    const grid = $("browse-grid");
    grid.replaceChildren(...page.names.map((name) => figure(name, imageURL(name, 128), [["name", name]], () => useDatabaseImage(name))));
    const last = Math.min(page.offset + page.names.length, page.total);
    $("page-label").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "no images";
    $("prev-page").disabled = page.offset === 0;
    $("next-page").disabled = last >= page.total;
  } catch (error) {
    setStatus(error.message, true);
  }
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });
}

async function useFile(file) {
  if (!file) return;
  try {
    const image = await loadImage(URL.createObjectURL(file));
    setQuery({ file }, image, file.name);
  } catch (error) {
    setStatus(`${file.name}: ${error.message}`, true);
  }
}

async function useDatabaseImage(name) {
  try {
    setQuery({ name }, await loadImage(imageURL(name)), name);
  } catch (error) {
    setStatus(`${name}: ${error.message}`, true);
  }
}

function setQuery(query, image, label) {
  state.query = query;
  state.image = image;
  state.box = null;
  const canvas = $("query-canvas");
  state.scale = Math.min(480 / image.naturalWidth, 400 / image.naturalHeight, 1);
  canvas.width = Math.max(1, Math.round(image.naturalWidth * state.scale));
  canvas.height = Math.max(1, Math.round(image.naturalHeight * state.scale));
  $("canvas-hint").textContent = `${label} (${image.naturalWidth}×${image.naturalHeight}): drag on the image to draw the object's box.`;
  $("search-button").disabled = false;
  drawQuery();
  setStatus("");
}

// ---------------------------------------------------------------- drawing the box
function drawQuery(dragBox) {
  const canvas = $("query-canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.image) return;
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const box = dragBox || state.box;
  if (box) {
    const [x1, y1, x2, y2] = box.map((v) => v * state.scale);
    ctx.fillStyle = "rgba(0, 0, 0, 0.35)";
    ctx.fillRect(0, 0, canvas.width, y1);
    ctx.fillRect(0, y2, canvas.width, canvas.height - y2);
    ctx.fillRect(0, y1, x1, y2 - y1);
    ctx.fillRect(x2, y1, canvas.width - x2, y2 - y1);
    ctx.strokeStyle = "#e53935";
    ctx.lineWidth = 2;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
  $("box-label").textContent = state.box ? `box: ${state.box.map((v) => Math.round(v)).join(", ")}` : "box: whole image";
}

function imagePoint(event) {
  const canvas = $("query-canvas");
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * (canvas.width / rect.width)) / state.scale;
  const y = ((event.clientY - rect.top) * (canvas.height / rect.height)) / state.scale;
  return [Math.min(Math.max(x, 0), state.image.naturalWidth), Math.min(Math.max(y, 0), state.image.naturalHeight)];
}

function boxOf(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

function setUpDrawing() {
  const canvas = $("query-canvas");
  let start = null;
  canvas.addEventListener("mousedown", (event) => {
    if (!state.image) return;
    start = imagePoint(event);
    event.preventDefault();
  });
  window.addEventListener("mousemove", (event) => {
    if (start) drawQuery(boxOf(start, imagePoint(event)));
  });
  window.addEventListener("mouseup", (event) => {
    if (!start) return;
    const box = boxOf(start, imagePoint(event));
    start = null;
    // A click (or a box under 3 image pixels) means: the whole image.
    state.box = box[2] - box[0] >= 3 && box[3] - box[1] >= 3 ? box : null;
    drawQuery();
  });
  $("whole-image").addEventListener("click", () => {
    state.box = null;
    drawQuery();
  });
}

// ---------------------------------------------------------------- searching
async function search(event) {
  event.preventDefault();
  if (!state.query) return;
  const form = new FormData();
  if (state.query.file) form.append("image", state.query.file);
  else form.append("name", state.query.name);
  if (state.box) form.append("box", state.box.map((v) => v.toFixed(1)).join(","));
  form.append("crop", document.querySelector('input[name="crop"]:checked').value);
  form.append("qe", $("qe").value);
  form.append("rerank", $("rerank").checked && !$("rerank").disabled ? "1" : "0");
  form.append("k", $("k").value || "20");
  form.append("clusters", "1");
  $("search-button").disabled = true;
  setStatus("searching…");
  try {
    const answer = await fetchJSON("/api/search", { method: "POST", body: form });
    state.queryClusters = answer.query_clusters || null;
    showResults(answer.results);
    const timing = answer.timing_ms;
    $("timings").textContent = Object.entries(timing).map(([step, ms]) => `${step} ${ms.toFixed(0)} ms`).join(" · ");
    setStatus(`${answer.results.length} results`);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("search-button").disabled = false;
  }
}

function showResults(results) {
  $("detail").hidden = true;
  $("results").replaceChildren(
    ...results.map((result) =>
      figure(
        result.name,
        imageURL(result.name, 192),
        [
          ["rank", `#${result.rank} `],
          ["score", `${result.score.toFixed(3)} `],
          ["name", result.name],
        ],
        () => showDetail(result),
      ),
    ),
  );
}

async function showDetail(result) {
  $("detail").hidden = false;
  $("detail-title").textContent = `#${result.rank} ${result.name} (score ${result.score.toFixed(3)})`;
  $("result-clusters").src = `/api/clusters/${result.name.split("/").map(encodeURIComponent).join("/")}`;
  if (state.queryClusters) $("query-clusters").src = state.queryClusters;
  try {
    const image = await loadImage(imageURL(result.name));
    const canvas = $("detail-canvas");
    const scale = Math.min(640 / image.naturalWidth, 480 / image.naturalHeight, 1);
    canvas.width = Math.round(image.naturalWidth * scale);
    canvas.height = Math.round(image.naturalHeight * scale);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    if (result.box) {
      const [x1, y1, x2, y2] = result.box.map((v) => v * scale);
      ctx.strokeStyle = "#fdd835";
      ctx.lineWidth = 3;
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    }
    $("detail").scrollIntoView({ block: "nearest" });
  } catch (error) {
    setStatus(error.message, true);
  }
}

// ---------------------------------------------------------------- wiring
function setUp() {
  $("tab-upload").addEventListener("click", () => showTab("upload"));
  $("tab-browse").addEventListener("click", () => showTab("browse"));
  $("file-input").addEventListener("change", (event) => useFile(event.target.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    useFile(event.dataTransfer.files[0]);
  });
  $("prefix").addEventListener("input", () => browse(0));
  $("prev-page").addEventListener("click", () => browse(Math.max(0, state.offset - PAGE_SIZE)));
  $("next-page").addEventListener("click", () => browse(state.offset + PAGE_SIZE));
  $("options").addEventListener("submit", search);
  $("close-detail").addEventListener("click", () => ($("detail").hidden = true));
  setUpDrawing();
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
