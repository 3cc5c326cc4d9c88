// The service panel: /readyz (workers and, per worker, the load its last heartbeat carried: tokens generated,
// canvases in flight, memory) and /metrics (queue depth), polled every two seconds. Tokens/s is the growth
// of each worker's token count between its heartbeats, summed over workers and plotted over the last minute.

import { metricsText, readiness } from "./api.js";
import { $, el, formatBytes } from "./util.js";

const POLL_MS = 2000;
const WINDOW_MS = 60000;
const workers = {}; // worker_id -> {tokens, seen, rate}: the last heartbeat's count, its time, the rate since
const samples = []; // {at, rate, added}: one per poll
let firstPollAt = null;

/** Value of the first sample of `name` in a Prometheus exposition (labels ignored), or null. */
export function metricValue(text, name) {
  const line = text.split("\n").find((row) => row.startsWith(`${name}{`) || row.startsWith(`${name} `));
  return line ? Number(line.slice(line.lastIndexOf(" ") + 1)) : null;
}

/**
 * Fold this poll's worker loads into the per-worker rates. A worker's rate is the growth of its token
 * count between two of its heartbeats over their own timestamps (`last_seen`), so polling faster or slower
 * than workers beat neither adds zeros nor spikes. A count that went down (a restarted worker) adds nothing.
 */
function tokenSample(now, loads) {
  let added = 0;
  const live = new Set();
  for (const load of loads) {
    live.add(load.worker_id);
    const tokens = load.generated_tokens || 0;
    const known = workers[load.worker_id];
    if (!known) {
      workers[load.worker_id] = { tokens, seen: load.last_seen, rate: 0 };
    } else if (load.last_seen > known.seen) {
      const grown = Math.max(0, tokens - known.tokens);
      added += grown;
      Object.assign(known, { tokens, seen: load.last_seen, rate: grown / (load.last_seen - known.seen) });
    }
  }
  for (const id of Object.keys(workers)) if (!live.has(id)) delete workers[id];
  const rate = Object.values(workers).reduce((sum, worker) => sum + worker.rate, 0);
  return { at: now, rate, added };
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
  $("svc-plot").setAttribute("aria-label", `tokens per second over the last minute, peak ${peak.toFixed(0)}`);
  // Mean over the part of the last minute this page has watched.
  const seconds = (now - Math.max(firstPollAt, now - WINDOW_MS)) / 1000;
  const mean = seconds > 0 ? samples.reduce((sum, sample) => sum + sample.added, 0) / seconds : 0;
  $("svc-tps-minute").textContent = seconds > 0 ? mean.toFixed(1) : "–";
  $("svc-tps-minute").dataset.value = String(mean);
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
  if (firstPollAt === null) firstPollAt = now;
  try {
    const [ready, metrics] = await Promise.all([readiness(), metricsText().catch(() => "")]);
    $("svc-ready").textContent = ready.ready ? "ready" : `not ready: ${ready.reason || "unknown"}`;
    $("svc-ready").dataset.status = ready.ready ? "ready" : "not-ready";
    $("svc-workers").textContent = String(ready.workers ?? "–");
    const depth = metricValue(metrics, "dgserve_queue_depth");
    $("svc-queue").textContent = depth === null || depth < 0 ? "unknown" : String(depth);
    const loads = ready.worker_load || [];
    const sample = tokenSample(now, loads);
    samples.push(sample);
    $("svc-tps").textContent = sample.rate.toFixed(1);
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
