// batchserve page: a client of the public API, nothing more. It reads /v1/info for the live
// state and for what the server offers, submits through the jobs API when the server's jobs are
// shared (and polls it, as web-queue-worker products do), else through /t2i (see useJobs);
// every image of a submit is sent at once so they can share a batch. An init image (and a mask,
// uploaded or painted on a canvas) is sent as a data: URL in init_image / mask_image.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "batchserve.api_key";
const FIELDS = ["prompt", "negative_prompt", "width", "height", "inference_steps",
                "guidance_scale", "sampler", "seed", "count", "api_key", "init_image",
                "strength", "mask_image", "mask_blur", "lora"];
const MAX_COUNT = 8;
const POLL_MS = [250, 250, 500, 500, 1000];  // jobs polling backoff, then every second

let info = null;
const RATE_WINDOW_MS = 10000;
let counts = [];  // [images_total, time] samples of the last RATE_WINDOW_MS, for images/s

// -- live state ------------------------------------------------------------------------------

async function refreshInfo() {
  try {
    const response = await fetch("/v1/info", { cache: "no-store" });
    info = await response.json();
    showLive(info);
  } catch (err) {
    setState("unreachable", false);
  }
}

function showLive(data) {
  const live = data.live || {};
  showBatchProgress(live.progress);
  setState(data.state === "ready" ? "ready" : data.state, data.state === "ready");
  $("queue").textContent = String(live.queue_depth ?? data.batching?.queue_depth ?? "–");
  const now = performance.now();
  if (typeof live.images_total === "number") {
    counts.push([live.images_total, now]);
    counts = counts.filter(([, t]) => now - t <= RATE_WINDOW_MS);
    const [first, since] = counts[0];
    if (now > since) {
      $("rate").textContent = ((live.images_total - first) / ((now - since) / 1000)).toFixed(2);
    }
  }
  const engine = data.engine || {};
  $("model").textContent = engine.model ? `${engine.model} on ${engine.device}` : "";
  $("key-field").hidden = !(data.auth && data.auth.t2i);
  fillSamplers(data.samplers);
  fillSizes(data.sizes);
  fillLoras(data.loras);
  showImageFields(data.image_inputs || []);
}

function setState(text, ready) {
  const el = $("state");
  el.textContent = text;
  el.className = "state " + (ready ? "ready" : "down");
}

function fillSamplers(samplers) {
  const select = $("sampler");
  if (!samplers || select.options.length) return;
  for (const name of samplers.served) {
    const option = new Option(name === samplers.default ? `${name} (default)` : name, name);
    option.selected = name === samplers.default;
    select.add(option);
  }
}

// Per-request LoRA (--lora-dir): the usable files of GET /v1/loras, listed once; one per
// submit from the page (the API takes up to --max-loras-per-request).
let lorasFilled = false;

async function fillLoras(loras) {
  if (!loras || !loras.enabled || lorasFilled) return;
  lorasFilled = true;
  try {
    const listing = await (await fetch("/v1/loras", { cache: "no-store" })).json();
    const select = $("lora");
    for (const entry of listing.loras) {
      if (entry.usable) select.add(new Option(entry.name, entry.name));
    }
    $("lora-field").hidden = false;
  } catch (err) {
    lorasFilled = false;  // tried again at the next refresh
  }
}

// The served model family's sizes (SDXL: 1024x1024 and its buckets) replace the page's presets
// once; the preview, "the init image's size" and "custom" stay.
let sizesFilled = false;

function fillSizes(sizes) {
  if (!sizes || sizesFilled) return;
  sizesFilled = true;
  const select = $("size");
  // A choice made before /v1/info answered is the user's: it stays, and stays selected.
  const untouched = select.value === "512x512" && $("width").value === "512"
    && $("height").value === "512";
  const keep = new Set(["128x128", "image", "custom", untouched ? "" : select.value]);
  for (const option of [...select.options]) {
    if (!keep.has(option.value)) option.remove();
  }
  const before = select.querySelector('option[value="image"]');
  for (const value of sizes.presets) {
    if (keep.has(value)) continue;
    const [w, h] = value.split("x").map(Number);
    const shape = w > h ? " wide" : w < h ? " tall" : "";
    const label = `${w} × ${h}${shape}${value === sizes.default ? " (default)" : ""}`;
    select.add(new Option(label, value), before);
  }
  if (untouched) {
    select.value = sizes.default;
    onSizeChange();
  }
}

function defaultSize() {
  return (info && info.sizes && info.sizes.default) || "512x512";
}

// -- errors next to their field --------------------------------------------------------------

function clearErrors() {
  for (const el of document.querySelectorAll(".error")) el.textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showError(field, message) {
  const name = field === "num_inference_steps" ? "inference_steps"
    : field && field.startsWith("loras") ? "lora" : field;
  const slot = FIELDS.includes(name) ? $(`${name}-error`) : null;
  (slot || $("form-error")).textContent = message;  // the server's message, as is
  const input = slot ? $(name) : null;
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

// -- the request -----------------------------------------------------------------------------

function readForm() {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value };
  // Numbers are sent as typed; the server judges them, so its messages show here unchanged.
  const numbers = ["inference_steps", "guidance_scale"];
  // With the init image's own size chosen, the server takes it (rounded down to the model's
  // size multiple, /v1/info's sizes.multiple_of).
  if ($("size").value !== "image") numbers.push("width", "height");
  if (painting.dataUrl) numbers.push("strength");
  if (painting.dataUrl && (painting.maskUrl || painting.strokes)) numbers.push("mask_blur");
  for (const name of numbers) {
    const raw = $(name).value.trim();
    if (raw !== "") body[name] = Number.isNaN(Number(raw)) ? raw : Number(raw);
  }
  if ($("sampler").value) body.sampler = $("sampler").value;
  if ($("lora").value) {
    const raw = $("lora_scale").value.trim();
    const scale = raw === "" ? 1 : Number.isNaN(Number(raw)) ? raw : Number(raw);
    body.loras = [{ name: $("lora").value, scale }];
  }
  if (painting.dataUrl) {
    body.init_image = painting.dataUrl;
    if (painting.maskUrl) body.mask_image = painting.maskUrl;
    else if (painting.strokes) body.mask_image = painting.mask.toDataURL("image/png");
  }
  const seed = $("seed").value.trim();
  const count = Number($("count").value || "1");
  return { body, seed, count };
}

// -- an init image and its mask --------------------------------------------------------------

// The uploaded image as the data: URL sent (its own bytes: the server orients and converts it),
// and the mask painted over it: white strokes on black at the image's pixel size (`mask`), shown
// as a red veil (`veil`) over the image on the visible canvas.
const painting = { dataUrl: null, image: null, mask: null, veil: null, maskUrl: null,
                   strokes: false, last: null };

function showImageFields(inputs) {
  $("image-fields").hidden = !inputs.includes("img2img");
  for (const el of document.querySelectorAll("[data-inpaint]")) {
    el.hidden = !inputs.includes("inpaint") || (el.id === "painter" && !painting.image);
  }
}

function readAsDataUrl(file) {
  return new Promise((done, fail) => {
    const reader = new FileReader();
    reader.onload = () => done(reader.result);
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(file);
  });
}

async function onInitImage() {
  const file = $("init_image").files[0];
  if (!file) return clearImage();
  painting.dataUrl = await readAsDataUrl(file);
  const image = new Image();
  image.onload = () => startPainting(image);
  image.onerror = () => { painting.image = null; };  // the server will say what is wrong
  image.src = painting.dataUrl;
}

function startPainting(image) {
  painting.image = image;
  const [w, h] = [image.naturalWidth, image.naturalHeight];  // upright, as the server sees it
  for (const name of ["mask", "veil"]) {
    painting[name] = document.createElement("canvas");
    painting[name].width = w;
    painting[name].height = h;
  }
  clearMask();
  const canvas = $("paint");
  canvas.width = w;
  canvas.height = h;
  $("size").querySelector('option[value="image"]').disabled = false;
  $("size").value = "image";
  ownSize();
  showImageFields((info && info.image_inputs) || []);
  redraw();
}

function ownSize() {  // shown only: with this choice the server takes the image's own size
  const [w, h] = [painting.image.naturalWidth, painting.image.naturalHeight];
  $("width").value = String(w - (w % 8));
  $("height").value = String(h - (h % 8));
}

function clearMask() {
  if (!painting.mask) return;
  const mask = painting.mask.getContext("2d");
  mask.fillStyle = "#000";
  mask.fillRect(0, 0, painting.mask.width, painting.mask.height);
  painting.veil.getContext("2d").clearRect(0, 0, painting.veil.width, painting.veil.height);
  painting.strokes = false;
  redraw();
}

function clearImage() {
  Object.assign(painting, { dataUrl: null, image: null, mask: null, veil: null, strokes: false,
                            maskUrl: null });
  $("init_image").value = "";
  $("mask_image").value = "";
  $("size").querySelector('option[value="image"]').disabled = true;
  if ($("size").value === "image") {
    $("size").value = defaultSize();
    onSizeChange();
  }
  showImageFields((info && info.image_inputs) || []);
}

function redraw() {
  if (!painting.image) return;
  const ctx = $("paint").getContext("2d");
  ctx.drawImage(painting.image, 0, 0);
  ctx.globalAlpha = 0.5;
  ctx.drawImage(painting.veil, 0, 0);
  ctx.globalAlpha = 1;
}

function paintAt(event) {
  const canvas = $("paint");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;  // brush size is in screen pixels
  const point = [(event.clientX - box.left) * scale, (event.clientY - box.top) * scale];
  const width = Math.max(1, Number($("brush").value) || 32) * scale;
  const from = painting.last || point;
  for (const [target, color] of [[painting.mask, "#fff"], [painting.veil, "#e02424"]]) {
    const ctx = target.getContext("2d");
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...point);
    ctx.stroke();
  }
  painting.last = point;
  painting.strokes = true;
  redraw();
}

async function onMaskFile() {
  const file = $("mask_image").files[0];
  painting.maskUrl = file ? await readAsDataUrl(file) : null;
}

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function errorOf(response) {
  try {
    const data = await response.json();
    if (data && data.error) {
      // A wrong or missing key belongs next to the key field, which must then be visible.
      if (response.status === 401) {
        $("key-field").hidden = false;
        return { field: "api_key", message: data.error.message };
      }
      return data.error;
    }
  } catch (err) { /* not JSON */ }
  return { field: null, message: `${response.status} ${response.statusText}` };
}

class Refused extends Error {
  constructor(error) { super(error.message); this.field = error.field; }
}

// -- progress --------------------------------------------------------------------------------
// Jobs: each card follows its own job's event stream (steps and previews). /t2i: the running
// batch's steps from /v1/info (no previews there: that route is open to everyone), shown on
// the cards still waiting, polled faster while a submit is pending.

function showProgress(card, fraction, preview) {
  const pending = card.querySelector(".pending");
  if (!pending) return;
  const bar = pending.querySelector("progress");
  bar.hidden = false;
  bar.value = Math.round(fraction * 100);
  if (preview) {
    const img = pending.querySelector(".preview");
    img.src = preview;
    img.hidden = false;
  }
}

function showBatchProgress(progress) {
  for (const card of document.querySelectorAll("#gallery .card[data-via='t2i']")) {
    const pending = card.querySelector(".pending");
    if (!pending) continue;
    if (progress) {
      showProgress(card, progress.fraction, null);
      pending.querySelector(".label").textContent =
        `running batch: step ${progress.step} of ${progress.steps}`;
    }
  }
}

// The job's events (GET /v1/jobs/{id}/events) read with fetch, which sends the API key (an
// EventSource cannot). Resolves with the final job view; rejects when the stream is not offered
// or breaks (the caller then polls).
async function followEvents(job, onStatus, onProgress) {
  const response = await fetch(`/v1/jobs/${encodeURIComponent(job.id)}/events`,
                               { headers: headers() });
  if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("events: the stream ended early");
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      const payload = JSON.parse(data);
      if (name === "queued") onStatus(`queued, position ${(payload.position ?? 0) + 1}`);
      else if (name === "started") onStatus("generating…");
      else if (name === "progress") {
        onStatus(`generating ${Math.round(payload.fraction * 100)}%`);
        onProgress(payload.fraction, payload.preview || null);
      } else if (["succeeded", "failed", "canceled"].includes(name)) {
        reader.cancel();
        return payload;
      }
    }
  }
}

async function viaT2I(text, onStatus) {
  const response = await fetch("/t2i", { method: "POST", headers: headers(), body: text });
  if (!response.ok) throw new Refused(await errorOf(response));
  const h = response.headers;
  return { blob: await response.blob(), seed: h.get("x-seed"), batch: h.get("x-batch-size"),
           queueMs: h.get("x-queue-ms"), inferenceMs: h.get("x-inference-ms") };
}

async function viaJobs(text, onStatus, onProgress) {
  const created = await fetch("/v1/jobs", { method: "POST", headers: headers(), body: text });
  if (!created.ok) throw new Refused(await errorOf(created));
  let job = await created.json();
  try {
    job = await followEvents(job, onStatus, onProgress);
  } catch (err) { /* no stream here, or it broke: poll the job below */ }
  for (let i = 0; !["succeeded", "failed", "canceled"].includes(job.status); i++) {
    await new Promise((done) => setTimeout(done, POLL_MS[Math.min(i, POLL_MS.length - 1)]));
    const polled = await fetch(`/v1/jobs/${encodeURIComponent(job.id)}`, { headers: headers() });
    if (!polled.ok) throw new Refused(await errorOf(polled));
    job = await polled.json();
    onStatus(job.status === "queued" && job.queue_position != null
      ? `queued, position ${job.queue_position + 1}` : `${job.status}…`);
  }
  if (job.status !== "succeeded") {
    throw new Refused({ field: null, message: job.error ? job.error.message : `job ${job.status}` });
  }
  const image = await fetch(`/v1/jobs/${encodeURIComponent(job.id)}/image?redirect=false`,
                            { headers: headers() });  // bytes, never a 302 the CSP would block
  if (!image.ok) throw new Refused(await errorOf(image));
  const r = job.result;
  return { blob: await image.blob(), seed: String(r.seed), batch: String(r.batch_size),
           queueMs: String(r.queue_ms), inferenceMs: String(r.inference_ms) };
}

// Jobs when every process behind this address shares them (a Redis queue and a result store
// that is not in memory, or a --role api process in front of workers): a poll or the image
// fetch may then reach any replica. Memory-backed jobs live in one process, and behind a
// balancer a poll could land on a replica that never saw the job; /t2i carries its image in
// the one request, so the page uses it there.
function useJobs(data) {
  const jobs = data && data.jobs;
  if (!jobs) return false;
  return data.role === "api" || (jobs.queue !== "memory" && jobs.results !== "memory");
}

// -- the gallery -----------------------------------------------------------------------------

function placeholder(label) {
  const card = document.createElement("li");
  card.className = "card";
  const figure = document.createElement("figure");
  const wait = document.createElement("div");
  wait.className = "pending";
  const state = document.createElement("span");
  state.className = "label";
  state.textContent = "queued…";
  const bar = document.createElement("progress");
  bar.max = 100;
  bar.value = 0;
  bar.hidden = true;
  bar.setAttribute("aria-label", "progress");
  const preview = document.createElement("img");
  preview.className = "preview";
  preview.alt = "preview of the image being generated";
  preview.hidden = true;
  wait.append(state, bar, preview);
  const caption = document.createElement("figcaption");
  caption.textContent = label;
  figure.append(wait, caption);
  card.append(figure);
  return card;
}

function fill(card, body, done) {
  const url = URL.createObjectURL(done.blob);
  const figure = card.querySelector("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = `${body.prompt} (seed ${done.seed})`;
  if (body.width && body.height) {  // else the init image's size: the image's own
    img.width = body.width;
    img.height = body.height;
  }
  card.querySelector(".pending").replaceWith(img);
  const caption = figure.querySelector("figcaption");
  caption.replaceChildren();
  const line = (label, value) => {
    const span = document.createElement("span");
    const b = document.createElement("b");
    b.textContent = value;
    span.append(`${label} `, b);
    caption.append(span);
  };
  line("seed", done.seed);
  line("batch", done.batch);
  line("queue", `${Math.round(Number(done.queueMs))} ms`);
  line("inference", `${Math.round(Number(done.inferenceMs))} ms`);
  const link = document.createElement("a");
  link.href = url;
  link.download = `batchserve-${done.seed}.png`;
  link.textContent = "Download";
  caption.append(link);
  card.dataset.seed = done.seed;
}

function failed(card, message) {
  card.classList.add("failed");
  card.querySelector(".pending").replaceChildren(message);
}

// -- submit ----------------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const key = $("api_key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
  const { body, seed, count } = readForm();
  if (!Number.isInteger(count) || count < 1 || count > MAX_COUNT) {
    showError("count", `count must be between 1 and ${MAX_COUNT}`);
    return;
  }
  let first = null;
  if (seed !== "") {
    if (!/^\d+$/.test(seed)) {
      showError("seed", "seed must be a whole number, or blank for random");
      return;
    }
    first = BigInt(seed);
  }
  const send = useJobs(info) ? viaJobs : viaT2I;
  const button = $("submit");
  button.disabled = true;
  const bodies = [];
  for (let i = 0; i < count; i++) {
    bodies.push(jsonText(body, first === null ? null : first + BigInt(i)));  // seed, seed+1, ...
  }
  const cards = bodies.map((b, i) => placeholder(count > 1 ? `image ${i + 1} of ${count}` : ""));
  $("gallery").prepend(...cards);  // newest submit first, its images in seed order
  let shown = false;
  // Each card is filled the moment its own image arrives, not when the last one does.
  const status = (card) => (text) => {
    const label = card.querySelector(".pending .label");
    if (label) label.textContent = text;
  };
  for (const card of cards) card.dataset.via = send === viaJobs ? "jobs" : "t2i";
  const fast = send === viaT2I ? setInterval(refreshInfo, 500) : null;  // the batch's steps
  await Promise.allSettled(bodies.map((text, i) => send(
    text, status(cards[i]), (fraction, preview) => showProgress(cards[i], fraction, preview),
  ).then(
    (done) => fill(cards[i], body, done),
    (err) => {
      if (err instanceof Refused && !shown) {
        showError(err.field, err.message);
        shown = true;
      }
      if (err instanceof Refused && err.field) cards[i].remove();
      else failed(cards[i], err.message || String(err));
    },
  )));
  if (fast !== null) clearInterval(fast);
  button.disabled = false;
  refreshInfo();
}

// The body as JSON text. A seed is spliced in as digits: JSON numbers in a script keep only
// 53 bits, and the server takes 63-bit seeds.
function jsonText(body, seed) {
  const text = JSON.stringify(body);
  return seed === null ? text : `${text.slice(0, -1)},"seed":${seed.toString()}}`;
}

// -- wiring ----------------------------------------------------------------------------------

function onSizeChange() {
  const value = $("size").value;
  if (value === "custom") {
    $("width").focus();
    return;
  }
  if (value === "image") {
    if (painting.image) ownSize();
    return;
  }
  const [w, h] = value.split("x");
  $("width").value = w;
  $("height").value = h;
}

function onDimensionInput() {
  const preset = `${$("width").value}x${$("height").value}`;
  const match = [...$("size").options].find((o) => o.value === preset);
  $("size").value = match ? preset : "custom";
}

document.addEventListener("DOMContentLoaded", () => {
  $("api_key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("generate").addEventListener("submit", submit);
  $("size").addEventListener("change", onSizeChange);
  $("width").addEventListener("input", onDimensionInput);
  $("height").addEventListener("input", onDimensionInput);
  $("init_image").addEventListener("change", onInitImage);
  $("mask_image").addEventListener("change", onMaskFile);
  $("clear-mask").addEventListener("click", clearMask);
  $("clear-image").addEventListener("click", clearImage);
  const canvas = $("paint");
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    painting.last = null;
    paintAt(event);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (canvas.hasPointerCapture(event.pointerId)) paintAt(event);
  });
  canvas.addEventListener("pointerup", () => { painting.last = null; });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("generate").requestSubmit();
    }
  });
  refreshInfo();
  setInterval(refreshInfo, 2000);
});
