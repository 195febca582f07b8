// aeserve map explorer: plain browser JavaScript against the service's own HTTP API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const state = { manifest: null, sample: null, bounds: null, marker: null, name: null, version: null };

function headers(extra = {}) {
  const key = $("key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function versionPath() {
  return `/v1/models/${encodeURIComponent(state.name)}/versions/${encodeURIComponent(state.version)}`;
}

// The last two dimensions of input_shape are an image's height and width; 1-D inputs show as one row.
function imageSize(shape) {
  return shape.length >= 2 ? [shape[shape.length - 2], shape[shape.length - 1]] : [1, shape[0]];
}

function drawPixels(canvas, values, shape) {
  const [h, w] = imageSize(shape);
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const context = small.getContext("2d");
  const image = context.createImageData(w, h);
  for (let i = 0; i < w * h; i++) {
    const v = Math.max(0, Math.min(255, Math.round(values[i] * 255)));
    image.data.set([v, v, v, 255], 4 * i);
  }
  context.putImageData(image, 0, 0);
  const target = canvas.getContext("2d");
  target.imageSmoothingEnabled = false;
  target.clearRect(0, 0, canvas.width, canvas.height);
  target.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function toCanvas(x, y) {
  const { minX, maxX, minY, maxY } = state.bounds;
  const canvas = $("map"), pad = 10;
  return [pad + ((x - minX) / (maxX - minX || 1)) * (canvas.width - 2 * pad),
          canvas.height - pad - ((y - minY) / (maxY - minY || 1)) * (canvas.height - 2 * pad)];
}

function drawMap() {
  const canvas = $("map"), context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const sample = state.sample || { x: [], y: [] };
  for (let i = 0; i < sample.x.length; i++) {
    const [cx, cy] = toCanvas(sample.x[i], sample.y[i]);
    context.fillStyle = sample.labels ? COLOURS[sample.labels[i] % COLOURS.length] : "#1f77b4";
    context.fillRect(cx - 1.5, cy - 1.5, 3, 3);
  }
  if (state.marker && state.bounds) {
    const [mx, my] = toCanvas(state.marker[0], state.marker[1]);
    context.strokeStyle = "#000"; context.lineWidth = 3;
    context.beginPath(); context.arc(mx, my, 9, 0, 2 * Math.PI); context.stroke();
    context.strokeStyle = "#ff0"; context.lineWidth = 1.5; context.stroke();
  }
}

async function loadSample() {
  state.sample = null; state.marker = null;
  if (!state.manifest.map_sample) {  // versions published before map samples existed
    drawMap();
    $("hover-label").textContent = "no map sample was stored with this version";
    return;
  }
  const sample = await (await api(`${versionPath()}/files/${state.manifest.map_sample}`)).json();
  const bytes = Uint8Array.from(atob(sample.thumbnails), (c) => c.charCodeAt(0));
  sample.size = sample.input_shape.reduce((a, b) => a * b, 1);
  sample.pixels = bytes;
  const xs = sample.x, ys = sample.y;
  state.bounds = { minX: Math.min(...xs), maxX: Math.max(...xs), minY: Math.min(...ys), maxY: Math.max(...ys) };
  state.sample = sample;
  state.marker = null;
  drawMap();
}

function showMetrics() {
  const metrics = state.manifest.metrics, table = $("metrics");
  table.innerHTML = "";
  for (const [key, value] of Object.entries(metrics)) {
    if (typeof value !== "number") continue;
    const row = table.insertRow();
    row.insertCell().textContent = key;
    row.insertCell().textContent = Number.isInteger(value) ? value : value.toPrecision(5);
  }
}

async function showReport() {
  $("figures").innerHTML = ""; $("report-link").innerHTML = "";
  if (!state.manifest.report) return;
  const markdown = await (await api(`${versionPath()}/files/${state.manifest.report}`)).text();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([markdown], { type: "text/markdown" }));
  link.textContent = "report (Markdown)";
  $("report-link").appendChild(link);
  for (const match of markdown.matchAll(/\]\(([a-z0-9_-]+\.png)\)/g)) {
    const blob = await (await api(`${versionPath()}/files/report/${match[1]}`)).blob();
    const image = document.createElement("img");
    image.alt = match[1]; image.src = URL.createObjectURL(blob);
    $("figures").appendChild(image);
  }
}

async function selectVersion() {
  state.version = $("version").value;
  try {
    state.manifest = await (await api(versionPath())).json();
    await loadSample();
    showMetrics();
    await showReport();
    say(`${state.name}:${state.manifest.version} (${state.manifest.kind}, code ${state.manifest.code_dim})`);
  } catch (error) { say(error.message, true); }
}

async function selectModel() {
  state.name = $("model").value;
  const model = state.models.find((m) => m.name === state.name);
  $("version").innerHTML = "";
  for (const alias of Object.keys(model.aliases)) $("version").add(new Option(`${alias} (${model.aliases[alias]})`, alias));
  for (const version of model.versions.slice().reverse()) $("version").add(new Option(version, version));
  await selectVersion();
}

async function loadModels() {
  try {
    state.models = (await (await api("/v1/models")).json()).models;
    $("model").innerHTML = "";
    for (const model of state.models) $("model").add(new Option(model.name, model.name));
    if (state.models.length) await selectModel(); else say("no models loaded", true);
  } catch (error) { say(error.message, true); }
}

function hover(event) {
  const sample = state.sample;
  if (!sample) return;
  const rect = $("map").getBoundingClientRect();
  const px = event.clientX - rect.left, py = event.clientY - rect.top;
  let best = -1, bestDistance = 64;
  for (let i = 0; i < sample.x.length; i++) {
    const [cx, cy] = toCanvas(sample.x[i], sample.y[i]);
    const d = (cx - px) ** 2 + (cy - py) ** 2;
    if (d < bestDistance) { best = i; bestDistance = d; }
  }
  if (best < 0) return;
  const values = Array.from(sample.pixels.subarray(best * sample.size, (best + 1) * sample.size), (v) => v / 255);
  drawPixels($("preview"), values, sample.input_shape);
  $("hover-label").textContent = sample.labels ? `label ${sample.labels[best]}` : `point ${best}`;
}

// Drawing: white strokes on black, as the training images are light on dark.
function setUpDrawing() {
  const canvas = $("draw"), context = canvas.getContext("2d");
  let drawing = false;
  const clear = () => { context.fillStyle = "#000"; context.fillRect(0, 0, canvas.width, canvas.height); };
  const point = (event) => {
    const rect = canvas.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  };
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    const [x, y] = point(event);
    context.beginPath(); context.moveTo(x, y);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const [x, y] = point(event);
    context.strokeStyle = "#fff"; context.lineWidth = 22; context.lineCap = "round";
    context.lineTo(x, y); context.stroke();
  });
  window.addEventListener("pointerup", () => { drawing = false; });
  $("clear").addEventListener("click", clear);
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (!file) return;
    const image = new Image();
    image.onload = () => { clear(); context.drawImage(image, 0, 0, canvas.width, canvas.height); };
    image.src = URL.createObjectURL(file);
  });
  clear();
}

// The drawing, downsampled to the model's input size, as raw input values (inverse of the stored preprocessing).
function drawnInput() {
  const shape = state.manifest.input_shape, [h, w] = imageSize(shape);
  // A drawing is pixels: for non-image inputs it fills a 1 x n strip.
  const { offset, scale } = state.manifest.preprocessing;
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const context = small.getContext("2d");
  context.drawImage($("draw"), 0, 0, w, h);
  const data = context.getImageData(0, 0, w, h).data;
  const plane = [];
  for (let i = 0; i < w * h; i++) plane.push(((data[4 * i] + data[4 * i + 1] + data[4 * i + 2]) / 765) / scale + offset);
  const channels = shape.length === 3 ? shape[0] : 1;
  return Array(channels).fill(plane).flat();
}

async function submit() {
  try {
    const row = drawnInput(), body = JSON.stringify({ inputs: [row] });
    const post = (op) => api(`${versionPath()}/${op}`, { method: "POST", body, headers: { "Content-Type": "application/json" } });
    const [reconstructed, projected] = await Promise.all([post("reconstruct"), post("project")]);
    const answer = await reconstructed.json(), where = await projected.json();
    const { offset, scale } = state.manifest.preprocessing;
    drawPixels($("reconstruction"), answer.outputs[0].flat(Infinity).map((v) => (v - offset) * scale), state.manifest.input_shape);
    $("score").textContent = `error ${answer.errors[0].toFixed(2)}, percentile ${answer.percentiles[0].toFixed(1)} among held-out inputs`;
    state.marker = where.outputs[0];
    if (!state.bounds || !state.sample) {  // no stored sample: frame the map around the marker
      state.bounds = { minX: state.marker[0] - 1, maxX: state.marker[0] + 1, minY: state.marker[1] - 1, maxY: state.marker[1] + 1 };
    }
    drawMap();
  } catch (error) { say(error.message, true); }
}

$("model").addEventListener("change", selectModel);
$("version").addEventListener("change", selectVersion);
$("map").addEventListener("mousemove", hover);
$("submit").addEventListener("click", submit);
setUpDrawing();
loadModels();
