// The generate view: a prompt or chat messages and the knobs; a live canvas that every denoising step's
// draft replaces in place (changed pieces highlighted), committed canvases stacking up, then the result.

import { ApiError, getWithRetry, request } from "./api.js";
import { buildKnobs, clearErrors, describeFailure, knobTarget, readKnobs, showError } from "./forms.js";
import * as jobs from "./jobs.js";
import * as jobview from "./jobview.js";
import { $, el, fillStats, jobStats, renderDraft } from "./util.js";

const ROLES = ["system", "user", "assistant"];
let current = null; // {id, controller, lastDraft, draftCanvas, drafts}
let messageIds = 0; // ids of message controls stay unique when rows are removed

function mode() {
  return document.querySelector('input[name="gen-mode"]:checked').value;
}

function addMessage(role = "user", content = "") {
  const list = $("gen-messages");
  const index = list.children.length;
  messageIds += 1;
  const roleId = `gen-message-${messageIds}-role`;
  const contentId = `gen-message-${messageIds}-content`;
  const select = el("select", { id: roleId });
  for (const name of ROLES) select.append(el("option", { value: name, text: name }));
  select.value = role;
  const text = el("textarea", { id: contentId, rows: "2", spellcheck: "false" });
  text.value = content;
  const remove = el("button", { type: "button", class: "link", "aria-label": `remove message ${index + 1}`, text: "remove" });
  remove.addEventListener("click", () => { list.removeChild(item); });
  const item = el("li", { class: "message" },
                  el("label", { for: roleId, class: "sr-only", text: `message ${index + 1} role` }), select,
                  el("label", { for: contentId, class: "sr-only", text: `message ${index + 1} content` }), text, remove,
                  el("p", { class: "field-error", role: "alert" }));
  list.append(item);
}

function readForm() {
  const body = { kind: "generate", ...readKnobs("gen"), stream_drafts: $("gen-stream-drafts").checked };
  if (mode() === "prompt") body.prompt = $("gen-prompt").value;
  else {
    body.messages = [...$("gen-messages").children].map((item) => ({
      role: item.querySelector("select").value, content: item.querySelector("textarea").value,
    }));
  }
  return body;
}

function fieldTarget(field) {
  if (field === "prompt") {
    return mode() === "prompt" ? { error: $("gen-prompt-error"), control: $("gen-prompt") }
      : { error: $("gen-messages-error"), control: null };
  }
  const message = /^messages\[(\d+)\]/.exec(field);
  if (message) {
    const item = $("gen-messages").children[Number(message[1])];
    if (item) return { error: item.querySelector(".field-error"), control: item.querySelector(field.endsWith("role") ? "select" : "textarea") };
  }
  if (field.startsWith("messages")) return { error: $("gen-messages-error"), control: null };
  return knobTarget("gen", field);
}

function setStatus(text) {
  $("gen-status").textContent = text;
  $("gen-status").dataset.status = text;
}

function resetView() {
  $("gen-committed").replaceChildren();
  $("gen-draft").replaceChildren();
  $("gen-result-box").hidden = true;
  $("gen-canvas").textContent = "–";
  $("gen-step").textContent = "–";
  $("gen-draft-count").textContent = "0";
  if (current) Object.assign(current, { lastDraft: "", draftCanvas: -1, drafts: 0 });
}

function onDraft(data) {
  const previous = data.canvas === current.draftCanvas ? current.lastDraft : "";
  renderDraft($("gen-draft"), previous, data.text);
  Object.assign(current, { lastDraft: data.text, draftCanvas: data.canvas, drafts: current.drafts + 1 });
  $("gen-draft-count").textContent = String(current.drafts);
  $("gen-canvas").textContent = String(data.canvas + 1);
  $("gen-step").textContent = String(data.step);
}

function onCanvas(data) {
  $("gen-committed").append(el("pre", { class: "committed", "data-canvas": String(data.canvas), text: data.text }));
  $("gen-draft").replaceChildren();
  $("gen-canvas").textContent = String(data.canvas + 1);
  $("gen-step").textContent = String(data.step);
  current.lastDraft = "";
}

async function showResult(jobId) {
  const job = await getWithRetry(`/v1/jobs/${encodeURIComponent(jobId)}`);
  if (job.result) {
    $("gen-result").textContent = job.result.text;
    $("gen-result-box").hidden = false;
  }
  fillStats($("gen-stats"), jobStats(job));
  if (job.result) $("gen-result-box").hidden = false;
  return job;
}

function handleEvent(jobId, type, data) {
  if (current === null || current.id !== jobId) return;
  if (type === "queued" || type === "started" || type === "requeued") {
    if (type !== "queued") resetView(); // a requeued job starts over: discard the earlier attempt's drafts
    setStatus(type === "started" ? "running" : type);
    jobs.updateStatus(jobId, type === "started" ? "running" : "queued");
  } else if (type === "draft") onDraft(data);
  else if (type === "canvas") onCanvas(data);
  else {
    const status = { done: "succeeded" }[type] || type;
    setStatus(data.error ? `${status}: ${data.error.message}` : status);
    jobs.updateStatus(jobId, status);
  }
}

/** Show job `jobId` in this view: replay its events from the start, then follow them live. */
export async function attach(jobId) {
  if (current) current.controller.abort();
  const controller = new AbortController();
  current = { id: jobId, controller, lastDraft: "", draftCanvas: -1, drafts: 0 };
  resetView();
  await jobview.follow(jobId, {
    prefix: "gen",
    controller,
    isCurrent: () => current !== null && current.id === jobId,
    setStatus,
    onEvent: (type, data) => handleEvent(jobId, type, data),
    showResult,
  });
}

async function submit(event) {
  event.preventDefault();
  const form = $("gen-form");
  clearErrors(form);
  const body = readForm();
  $("gen-submit").disabled = true;
  try {
    const job = await request("POST", "/v1/jobs", body);
    const label = (body.prompt || (body.messages || []).map((m) => m.content).join(" / ")).slice(0, 40);
    jobs.remember(job, label || job.id);
    attach(job.id);
  } catch (error) {
    const field = error instanceof ApiError ? error.field : null;
    showError("gen", field, describeFailure(error), fieldTarget);
  } finally {
    $("gen-submit").disabled = false;
  }
}

async function cancel() {
  if (current) await jobview.cancel("gen", current.id, setStatus);
}

export function init(defaults) {
  buildKnobs("gen", defaults);
  addMessage("system", "You write short Python functions.");
  addMessage("user", "def fibonacci(n):");
  for (const radio of document.querySelectorAll('input[name="gen-mode"]')) {
    radio.addEventListener("change", () => {
      $("gen-prompt-box").hidden = mode() !== "prompt";
      $("gen-chat-box").hidden = mode() !== "chat";
    });
  }
  $("gen-add-message").addEventListener("click", () => addMessage());
  $("gen-form").addEventListener("submit", submit);
  $("gen-cancel").addEventListener("click", cancel);
}
