// Upload page: send the chosen file to POST predict and show the digit and the ten probabilities.
"use strict";

const $ = (id) => document.getElementById(id);

function renderBars(probs) {
  const best = probs.indexOf(Math.max(...probs));
  $("bars").replaceChildren(...probs.map((p, digit) => {
    const item = document.createElement("li");
    item.className = digit === best ? "top" : "";
    item.setAttribute("aria-label", `digit ${digit}: ${(100 * p).toFixed(1)} percent`);
    item.innerHTML = `<span>${digit}</span><span class="track"><span class="fill"></span></span>` +
      `<span class="pct">${(100 * p).toFixed(1)}%</span>`;
    item.querySelector(".fill").style.width = `${100 * p}%`;
    return item;
  }));
}

function showError(message) {
  $("digit").textContent = "–";
  $("bars").replaceChildren();
  $("meta").textContent = "";
  $("error").textContent = message;
  $("error").hidden = false;
}

async function predict(file) {
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("error").hidden = true;
  $("digit").textContent = "…";
  const form = new FormData();
  form.append("file", file);
  const started = performance.now();
  let response, body;
  try {
    response = await fetch("predict", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    showError(`Request failed: ${err.message}`);
    return;
  }
  const ms = performance.now() - started;
  if (!response.ok) {
    showError(`${response.status}: ${body.detail ?? response.statusText}`);
    return;
  }
  $("digit").textContent = body.prediction;
  renderBars(body.probs);
  $("meta").textContent = `model ${body.model_version} · ${ms.toFixed(0)} ms`;
}

async function checkHealth() {
  const badge = $("health");
  try {
    const response = await fetch("healthz");
    const body = await response.json();
    badge.className = `badge ${response.ok ? "ok" : "bad"}`;
    badge.textContent = response.ok ? `model ${body.model_version} ready` : `not ready: ${body.detail}`;
  } catch (err) {
    badge.className = "badge bad";
    badge.textContent = "service unreachable";
  }
}

$("file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) predict(file);
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
  if (file) predict(file);
});
checkHealth();
setInterval(checkHealth, 10000);
