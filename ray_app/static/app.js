// The page: draw or upload a digit, send it to POST predict as a PNG, show the digit, the ten probabilities,
// the 28x28 image the model saw, a "not sure" note with the two likeliest digits when the answer is not
// confident, and the model card from GET model.
"use strict";

const $ = (id) => document.getElementById(id);
const percent = (p) => `${(100 * p).toFixed(1)}%`;

// ---- results
const ERROR_TITLES = {
  400: "The request was malformed",
  401: "This service needs an access token",
  408: "The upload took too long",
  413: "Too large",
  415: "Not a supported image",
  422: "Could not read a digit",
  503: "The model is not ready yet",
};

function renderBars(probs) {
  const best = probs.indexOf(Math.max(...probs));
  $("bars").replaceChildren(...probs.map((p, digit) => {
    const item = document.createElement("li");
    item.className = digit === best ? "top" : "";
    item.dataset.digit = digit;
    item.dataset.prob = p;
    item.setAttribute("aria-label", `digit ${digit}: ${percent(p)}`);
    item.innerHTML = `<span>${digit}</span><span class="track"><span class="fill"></span></span>` +
      `<span class="pct">${percent(p)}</span>`;
    item.querySelector(".fill").style.width = `${100 * p}%`;
    return item;
  }));
}

function showConfidence(confident, probs) {
  $("digit").classList.toggle("unsure", !confident);
  $("unsure").hidden = confident;
  if (confident) return;
  const [first, second] = probs.map((p, digit) => ({ p, digit })).sort((a, b) => b.p - a.p);
  $("unsure-text").replaceChildren(
    "Most likely ", Object.assign(document.createElement("b"), { textContent: first.digit }),
    ` (${percent(first.p)}) or `, Object.assign(document.createElement("b"), { textContent: second.digit }),
    ` (${percent(second.p)}).`,
  );
}

function showError(message) {
  showConfidence(true, []);
  $("digit").textContent = "–";
  $("bars").replaceChildren();
  $("seen").hidden = true;
  $("meta").textContent = "";
  $("error").textContent = message;
  $("error").hidden = false;
}

let latest = 0; // only the newest request may update the page

async function predict(blob, filename) {
  const mine = ++latest;
  $("error").hidden = true;
  $("digit").textContent = "…";
  $("result").setAttribute("aria-busy", "true");
  const form = new FormData();
  form.append("file", blob, filename);
  const started = performance.now();
  let response, body;
  try {
    response = await fetch("predict?include_input=1", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    if (mine === latest) showError(`Request failed: ${err.message}`);
    return;
  } finally {
    if (mine === latest) $("result").setAttribute("aria-busy", "false");
  }
  if (mine !== latest) return;
  const ms = performance.now() - started;
  if (!response.ok) {
    const title = ERROR_TITLES[response.status] ?? "Request refused";
    showError(`${title} (${response.status}): ${body.detail ?? response.statusText}`);
    return;
  }
  $("digit").textContent = body.prediction;
  renderBars(body.probs);
  showConfidence(body.confident !== false, body.probs); // a server without the field: confident
  if (body.input_png) {
    $("seen-img").src = `data:image/png;base64,${body.input_png}`;
    $("seen").hidden = false;
  }
  $("meta").replaceChildren(
    "model ", Object.assign(document.createElement("span"), { id: "meta-version", textContent: body.model_version }),
    " · ", Object.assign(document.createElement("span"), { id: "meta-latency", textContent: `${ms.toFixed(0)} ms` }),
    " round trip",
  );
  if (body.model_version !== shownVersion) loadModelCard();
}

// ---- upload: picker and drag-and-drop
function predictFile(file) {
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  predict(file, file.name);
}

$("file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) predictFile(file);
});
const drop = $("drop");
["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  const [file] = event.dataTransfer.files;
  if (file) predictFile(file);
});

// ---- drawing: pointer events cover mouse, pen and touch
const pad = $("pad");
const ink = pad.getContext("2d");
let drawing = false;
let inked = false;
let last = null;
let pending = 0;

function clearPad() {
  ink.fillStyle = "#ffffff"; // an opaque white background: a transparent PNG would lose the strokes' contrast
  ink.fillRect(0, 0, pad.width, pad.height);
  ink.strokeStyle = "#000000";
  ink.fillStyle = "#000000";
  ink.lineWidth = pad.width / 13; // about MNIST's stroke width relative to a digit filling the pad
  ink.lineCap = "round";
  ink.lineJoin = "round";
  inked = false;
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return { x: (event.clientX - box.left) * pad.width / box.width, y: (event.clientY - box.top) * pad.height / box.height };
}

function dot({ x, y }) {
  ink.beginPath();
  ink.arc(x, y, ink.lineWidth / 2, 0, 2 * Math.PI);
  ink.fill();
}

function predictDrawing() {
  clearTimeout(pending);
  if (!inked) {
    showError("Draw a digit first.");
    return;
  }
  pad.toBlob((blob) => predict(blob, "drawing.png"), "image/png");
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  clearTimeout(pending);
  drawing = true;
  inked = true;
  last = point(event);
  dot(last);
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  ink.beginPath();
  ink.moveTo(last.x, last.y);
  for (const each of events.length ? events : [event]) {
    last = point(each);
    ink.lineTo(last.x, last.y);
  }
  ink.stroke();
});
const endStroke = () => {
  if (!drawing) return;
  drawing = false;
  pending = setTimeout(predictDrawing, 400); // after a short pause, so a multi-stroke digit is sent once
};
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
$("clear").addEventListener("click", () => {
  clearTimeout(pending);
  clearPad();
});
$("predict-drawing").addEventListener("click", predictDrawing);

// ---- model card and health
let shownVersion = null;

function fact(term, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  dd.textContent = value;
  return [dt, dd];
}

async function loadModelCard() {
  let response, card;
  try {
    response = await fetch("model");
    card = await response.json();
  } catch (err) {
    return;
  }
  if (!response.ok) {
    $("model-facts").replaceChildren(...fact("status", card.detail ?? response.statusText));
    return;
  }
  shownVersion = card.version;
  const facts = [["version", card.version]];
  if (card.test_accuracy != null) facts.push(["test accuracy", percent(card.test_accuracy)]);
  const calibration = card.calibration;
  if (calibration?.test) {
    facts.push(["calibration", `temperature ${calibration.temperature.toFixed(3)}, test ECE ` +
      `${percent(calibration.test.ece_before)} → ${percent(calibration.test.ece_after)}`]);
  }
  if (card.created_at) facts.push(["trained", new Date(card.created_at).toLocaleString()]);
  if (card.epochs != null) {
    const images = card.train_images ? ` on ${card.train_images.toLocaleString()} images` : "";
    const epochs = `${card.epochs} epoch${card.epochs === 1 ? "" : "s"}`;
    facts.push(["how", `${epochs}${images}, batch ${card.batch_size}, ` +
      `${card.num_workers} Ray Train workers, ${card.wall_time_s} s`]);
  }
  if (card.ray_version) facts.push(["software", `Ray ${card.ray_version}, PyTorch ${card.torch_version}`]);
  $("model-facts").replaceChildren(...facts.flatMap(([term, value]) => fact(term, value)));
  $("per-digit").replaceChildren(...(card.per_digit_accuracy ?? []).map((accuracy, digit) => {
    const item = document.createElement("li");
    item.textContent = `${digit}: ${percent(accuracy)}`;
    return item;
  }));
}

async function checkHealth() {
  const badge = $("health");
  try {
    const response = await fetch("healthz");
    const body = await response.json();
    badge.className = `badge ${response.ok ? "ok" : "bad"}`;
    badge.textContent = response.ok ? `model ${body.model_version} ready` : `not ready: ${body.detail}`;
    if (response.ok && body.model_version !== shownVersion) loadModelCard();
  } catch (err) {
    badge.className = "badge bad";
    badge.textContent = "service unreachable";
  }
}

clearPad();
checkHealth();
setInterval(checkHealth, 10000);
