// Recent jobs of this key in this browser. The API has no "list my jobs" route, so the page remembers the
// ids it submitted (per key: a hash of the key names the list, never the key itself) and reads each job's
// status with GET /v1/jobs/{id}. After a reload the views reattach to jobs still queued or running.

import { apiKey, request } from "./api.js";
import { $, el } from "./util.js";

const MAX_JOBS = 20;
const MAX_STORED_DOCUMENT = 200000; // characters; bigger edit documents are not kept for reattaching
const FINISHED = new Set(["succeeded", "failed", "cancelled", "expired", "gone"]);

// FNV-1a: a stable name for this key's list (not a secret: the key itself is in localStorage already).
function keyTag(key) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < key.length; i += 1) {
    hash ^= key.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return key ? hash.toString(16) : "anonymous";
}

function storageKey() {
  return `dgserve.playground.jobs.${keyTag(apiKey())}`;
}

export function rememberedJobs() {
  try {
    return JSON.parse(localStorage.getItem(storageKey()) || "[]");
  } catch {
    return [];
  }
}

function store(jobs) {
  localStorage.setItem(storageKey(), JSON.stringify(jobs.slice(0, MAX_JOBS)));
}

/** Remember a submitted job; `context` is what a view needs to reattach (an edit's document and spans). */
export function remember(job, label, context = null) {
  const kept = context && context.document && context.document.length > MAX_STORED_DOCUMENT ? null : context;
  const entry = { id: job.id, kind: job.kind, status: job.status, created_at: job.created_at, label, context: kept };
  store([entry, ...rememberedJobs().filter((other) => other.id !== job.id)]);
  render();
}

export function updateStatus(jobId, status) {
  const jobs = rememberedJobs();
  const entry = jobs.find((job) => job.id === jobId);
  if (!entry || entry.status === status) return;
  entry.status = status;
  store(jobs);
  render();
}

let openHandler = () => {};

/** `handler(entry)` is called when the user opens a job from the list. */
export function onOpen(handler) {
  openHandler = handler;
}

export function render() {
  const list = $("job-list");
  const jobs = rememberedJobs();
  if (!jobs.length) {
    list.replaceChildren(el("li", { class: "hint", text: "no jobs yet" }));
    return;
  }
  list.replaceChildren(...jobs.map((entry) => {
    const open = el("button", { type: "button", class: "link", "data-job-id": entry.id,
                                "aria-label": `open ${entry.kind} job ${entry.id}`, text: entry.label || entry.id });
    open.addEventListener("click", () => openHandler(entry));
    const status = el("span", { class: `badge ${entry.status}`, text: entry.status });
    return el("li", { "data-job-id": entry.id }, el("span", { class: "kind", text: entry.kind }), open, status);
  }));
}

/** Re-read the status of every remembered job that has not finished; returns the refreshed list. */
export async function refresh() {
  const jobs = rememberedJobs();
  let changed = false;
  for (const entry of jobs) {
    if (FINISHED.has(entry.status)) continue;
    const before = entry.status;
    try {
      const job = await request("GET", `/v1/jobs/${encodeURIComponent(entry.id)}`);
      entry.status = job.status;
    } catch (error) {
      if (error.status === 404) entry.status = "gone";
      else if (error.status === 401) break; // wrong key: nothing of this list is readable
    }
    changed = changed || entry.status !== before;
  }
  if (!changed) return jobs; // re-rendering only on change keeps keyboard focus inside the list
  // Jobs submitted while this ran are in storage now: merge the statuses into the current list.
  const statuses = Object.fromEntries(jobs.map((entry) => [entry.id, entry.status]));
  const latest = rememberedJobs();
  for (const entry of latest) if (entry.id in statuses && !FINISHED.has(entry.status)) entry.status = statuses[entry.id];
  store(latest);
  render();
  return latest;
}

export function isFinished(status) {
  return FINISHED.has(status);
}
