// The service panel: /readyz (workers and, per worker, the load its last heartbeat carried: tokens generated,
// canvases in flight, memory) and /metrics (queue depth), polled every two seconds. Tokens/s is the growth
// of the workers' token counts between polls, plotted over the last minute.

import { metricsText, readiness } from "./api.js";
import { $, el, formatBytes } from "./util.js";

const POLL_MS = 2000;
const WINDOW_MS = 60000;
let previous = null; // {at, tokens: {worker_id: count}}
const samples = []; // {at, rate}

/** Value of the first sample of `name` in a Prometheus exposition (labels ignored), or null. */
export function metricValue(text, name) {
  const line = text.split("\n").find((row) => row.startsWith(`${name}{`) || row.startsWith(`${name} `));
  return line ? Number(line.slice(line.lastIndexOf(" ") + 1)) : null;
}

/** Tokens per second since the last poll, summed over workers present both times (a restarted worker,
 * whose count went down, adds nothing for that interval). */
function tokenRate(now, loads) {
  const tokens = Object.fromEntries(loads.map((load) => [load.worker_id, load.generated_tokens || 0]));
  let sample = null;
  if (previous && now > previous.at) {
    let added = 0;
    for (const [worker, count] of Object.entries(tokens)) {
      if (worker in previous.tokens) added += Math.max(0, count - previous.tokens[worker]);
    }
    const seconds = (now - previous.at) / 1000;
    sample = { at: now, rate: added / seconds, added, seconds };
  }
  previous = { at: now, tokens };
  return sample;
}

function plot(now) {
  while (samples.length && samples[0].at < now - WINDOW_MS) samples.shift();
  const peak = Math.max(1, ...samples.map((sample) => sample.rate));
  const points = samples.map((sample) => {
    const x = 240 - ((now - sample.at) / WINDOW_MS) * 240;
    const y = 58 - (sample.rate / peak) * 54;
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  $("svc-plot").querySelector("polyline").setAttribute("points", points.join(" "));
  const seconds = samples.reduce((sum, sample) => sum + sample.seconds, 0);
  const mean = seconds > 0 ? samples.reduce((sum, sample) => sum + sample.added, 0) / seconds : 0;
  $("svc-tps-minute").textContent = seconds > 0 ? mean.toFixed(1) : "–";
  $("svc-tps-minute").dataset.value = String(mean);
  $("svc-plot").setAttribute("aria-label", `tokens per second over the last minute, peak ${peak.toFixed(0)}`);
}

function showLoads(loads) {
  $("svc-inflight").textContent = String(loads.reduce((sum, load) => sum + (load.canvases_in_flight || 0), 0));
  $("svc-memory").replaceChildren(...loads.map((load) => el("li", {
    text: `${load.gpu === "cpu" ? "cpu (process RSS / RAM)" : `card ${load.gpu}`}: ${formatBytes(load.memory_used_bytes)} / ${formatBytes(load.memory_total_bytes)}`,
  })));
  if (!loads.length) $("svc-memory").replaceChildren(el("li", { class: "hint", text: "no live worker" }));
}

async function poll() {
  const now = Date.now();
  try {
    const [ready, metrics] = await Promise.all([readiness(), metricsText().catch(() => "")]);
    $("svc-ready").textContent = ready.ready ? "ready" : `not ready: ${ready.reason || "unknown"}`;
    $("svc-ready").dataset.status = ready.ready ? "ready" : "not-ready";
    $("svc-workers").textContent = String(ready.workers ?? "–");
    const depth = metricValue(metrics, "dgserve_queue_depth");
    $("svc-queue").textContent = depth === null || depth < 0 ? "unknown" : String(depth);
    const loads = ready.worker_load || [];
    const sample = tokenRate(now, loads);
    if (sample !== null) {
      samples.push(sample);
      $("svc-tps").textContent = sample.rate.toFixed(1);
    }
    showLoads(loads);
    plot(now);
    $("svc-error").textContent = "";
  } catch (error) {
    $("svc-ready").textContent = "API unreachable";
    $("svc-ready").dataset.status = "not-ready";
    $("svc-error").textContent = String(error.message || error);
  }
}

export function init() {
  poll();
  setInterval(poll, POLL_MS);
}
