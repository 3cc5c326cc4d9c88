// The edit view: a document, spans picked with the mouse (or typed as offsets) each with an instruction and
// a token budget; the spans' drafts update live inside the document while the text outside stays fixed;
// the result as the new document and a unified diff; accept writes it back so the next edit continues.
// Offsets shown and sent are code points, as the API counts them (util.js converts from the textarea's).

import { ApiError, getWithRetry, request } from "./api.js";
import { buildKnobs, clearErrors, describeFailure, knobTarget, readKnobs, showError } from "./forms.js";
import * as jobs from "./jobs.js";
import * as jobview from "./jobview.js";
import { $, codePointLength, el, fillStats, jobStats, renderDraft, sliceCodePoints, toCodePoints } from "./util.js";

let rowIds = 0;
let current = null; // {id, controller, document, spans, drafts, marks}
let lastResult = null;

function selection() {
  const area = $("edit-doc");
  return { start: toCodePoints(area.value, area.selectionStart), end: toCodePoints(area.value, area.selectionEnd) };
}

function showSelection() {
  const { start, end } = selection();
  $("edit-selection").textContent = start === end ? `cursor at ${start}` : `selection: [${start}, ${end})`;
}

function numberInput(id, value, label) {
  const input = el("input", { id, type: "number", min: "0", step: "1", inputmode: "numeric", "aria-label": label });
  if (value !== null && value !== undefined) input.value = String(value);
  return input;
}

function refreshPreview(row) {
  const documentText = $("edit-doc").value;
  const start = Number(row.querySelector(".span-start").value);
  const end = Number(row.querySelector(".span-end").value);
  const ok = Number.isInteger(start) && Number.isInteger(end) && start <= end && end <= codePointLength(documentText);
  row.querySelector(".span-text").textContent = ok ? sliceCodePoints(documentText, start, end) : "?";
}

function renumber() {
  [...$("edit-spans").children].forEach((row, index) => { row.querySelector(".span-index").textContent = String(index); });
}

export function addSpan(start, end, instruction = "", maxTokens = "") {
  rowIds += 1;
  const id = `edit-span-${rowIds}`;
  const startInput = numberInput(`${id}-start`, start, "span start (code points)");
  const endInput = numberInput(`${id}-end`, end, "span end (code points)");
  startInput.className = "span-start";
  endInput.className = "span-end";
  const instructionInput = el("input", { id: `${id}-instruction`, class: "span-instruction", type: "text",
                                         "aria-label": "instruction for this span", placeholder: "e.g. fix the bug" });
  instructionInput.value = instruction;
  const budget = numberInput(`${id}-max-tokens`, maxTokens === "" ? null : maxTokens, "max tokens for this span");
  budget.className = "span-max-tokens";
  budget.placeholder = "auto";
  const remove = el("button", { type: "button", class: "link", "aria-label": "remove this span", text: "remove" });
  const row = el("tr", { id },
                 el("td", { class: "span-index" }), el("td", {}, startInput), el("td", {}, endInput),
                 el("td", {}, el("code", { class: "span-text" })), el("td", {}, instructionInput), el("td", {}, budget),
                 el("td", {}, remove, el("p", { class: "field-error", role: "alert" })));
  remove.addEventListener("click", () => { row.remove(); renumber(); preview(); });
  for (const input of [startInput, endInput]) input.addEventListener("input", () => { refreshPreview(row); preview(); });
  $("edit-spans").append(row);
  renumber();
  refreshPreview(row);
  preview();
  return row;
}

function readSpans() {
  return [...$("edit-spans").children].map((row) => {
    // An empty offset is left out, so the API names the span that lacks it (422 edits[i]).
    const spec = {};
    for (const side of ["start", "end"]) {
      const text = row.querySelector(`.span-${side}`).value.trim();
      if (text !== "") spec[side] = Number(text);
    }
    const instruction = row.querySelector(".span-instruction").value.trim();
    const budget = row.querySelector(".span-max-tokens").value.trim();
    if (instruction) spec.instruction = instruction;
    if (budget) spec.max_tokens = Number(budget);
    return spec;
  });
}

function fieldTarget(field) {
  if (field === "document") return { error: $("edit-document-error"), control: $("edit-doc") };
  const match = /^edits\[(\d+)\](?:\.(\w+))?/.exec(field);
  if (match) {
    const row = $("edit-spans").children[Number(match[1])];
    if (!row) return { error: $("edit-edits-error"), control: null };
    const control = { max_tokens: ".span-max-tokens", instruction: ".span-instruction", end: ".span-end" }[match[2]] || ".span-start";
    return { error: row.querySelector(".field-error"), control: row.querySelector(control) };
  }
  if (field === "edits") return { error: $("edit-edits-error"), control: null };
  return knobTarget("edit", field);
}

function setStatus(text) {
  $("edit-status").textContent = text;
  $("edit-status").dataset.status = text;
}

/** The document with each span as a <mark> (its current text), the text between spans as plain text. */
function renderLive(documentText, spans) {
  const order = spans.map((span, index) => ({ ...span, index })).sort((a, b) => a.start - b.start);
  const fragment = document.createDocumentFragment();
  const marks = {};
  let cursor = 0;
  for (const span of order) {
    fragment.append(sliceCodePoints(documentText, cursor, span.start));
    const mark = el("mark", { class: "span pending", "data-edit": String(span.index),
                              text: sliceCodePoints(documentText, span.start, span.end) });
    marks[span.index] = mark;
    fragment.append(mark);
    cursor = span.end;
  }
  fragment.append(sliceCodePoints(documentText, cursor, codePointLength(documentText)));
  $("edit-live").replaceChildren(fragment);
  return marks;
}

/** Before a job runs: the document with the chosen spans marked, so a selection can be checked by eye. */
function preview() {
  const busy = ["connecting", "queued", "running", "requeued", "cancel requested"].includes($("edit-status").textContent);
  if (busy || !$("edit-result-box").hidden) return;
  const documentText = $("edit-doc").value;
  const size = codePointLength(documentText);
  const spans = readSpans().filter((span) => Number.isInteger(span.start) && Number.isInteger(span.end)
                                           && span.start <= span.end && span.end <= size);
  const sorted = [...spans].sort((a, b) => a.start - b.start);
  const overlapping = sorted.some((span, index) => index > 0 && span.start < sorted[index - 1].end);
  renderLive(documentText, overlapping ? [] : spans);
}

function onDraft(data) {
  $("edit-canvas").textContent = String(data.canvas + 1);
  $("edit-step").textContent = String(data.step);
  current.draftCount += 1;
  $("edit-draft-count").textContent = String(current.draftCount);
  for (const [index, text] of Object.entries(data.edits || {})) {
    const mark = current.marks[index];
    if (!mark) continue;
    mark.classList.remove("pending");
    renderDraft(mark, current.drafts[index] || "", text);
    current.drafts[index] = text;
  }
}

function renderDiff(diff) {
  const lines = diff.split("\n").map((line) => {
    const kind = line.startsWith("+++") || line.startsWith("---") ? "file" : line.startsWith("@@") ? "hunk"
      : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "ctx";
    return el("span", { class: `diff-${kind}`, text: `${line}\n` });
  });
  $("edit-diff").replaceChildren(...lines);
}

/** The new document in the live view, each replacement marked at its offsets in the new document. */
function renderFinal(result) {
  const spans = (result.edits || []).map((edit) => ({ start: edit.start, end: edit.end }));
  const marks = renderLive(result.document, spans);
  for (const mark of Object.values(marks)) mark.classList.replace("pending", "done");
}

async function showResult(jobId) {
  const job = await getWithRetry(`/v1/jobs/${encodeURIComponent(jobId)}`);
  fillStats($("edit-stats"), jobStats(job));
  if (!job.result) return job;
  lastResult = job.result;
  $("edit-result").textContent = job.result.document;
  renderDiff(job.result.diff || "");
  renderFinal(job.result);
  $("edit-result-box").hidden = false;
  return job;
}

function handleEvent(jobId, type, data) {
  if (current === null || current.id !== jobId) return;
  if (type === "queued" || type === "started" || type === "requeued") {
    if (type !== "queued") resetLive(); // a requeued job starts over
    setStatus(type === "started" ? "running" : type);
    jobs.updateStatus(jobId, type === "started" ? "running" : "queued");
  } else if (type === "draft") onDraft(data);
  else if (type === "canvas") {
    $("edit-canvas").textContent = String(data.canvas + 1);
  } else {
    const status = { done: "succeeded" }[type] || type;
    setStatus(data.error ? `${status}: ${data.error.message}` : status);
    jobs.updateStatus(jobId, status);
  }
}

function resetLive() {
  $("edit-result-box").hidden = true;
  for (const id of ["edit-canvas", "edit-step"]) $(id).textContent = "–";
  $("edit-draft-count").textContent = "0";
  if (!current) return;
  current.drafts = {};
  current.draftCount = 0;
  current.marks = current.document === null ? {} : renderLive(current.document, current.spans);
  if (current.document === null) $("edit-live").textContent = "(document not kept in this browser: the result appears when the job ends)";
}

/** Show edit job `jobId`: `context` is {document, spans} as submitted (null if unknown). */
export async function attach(jobId, context) {
  if (current) current.controller.abort();
  const controller = new AbortController();
  current = { id: jobId, controller, document: context ? context.document : null, spans: context ? context.spans : [] };
  lastResult = null;
  resetLive();
  await jobview.follow(jobId, {
    prefix: "edit",
    controller,
    isCurrent: () => current !== null && current.id === jobId,
    setStatus,
    onEvent: (type, data) => handleEvent(jobId, type, data),
    showResult,
  });
}

async function submit(event) {
  event.preventDefault();
  clearErrors($("edit-form"));
  const documentText = $("edit-doc").value;
  const spans = readSpans();
  const knobs = readKnobs("edit");
  const body = { kind: "edit", document: documentText, edits: spans, stream_drafts: true, ...knobs };
  $("edit-submit").disabled = true;
  try {
    const job = await request("POST", "/v1/jobs", body);
    const context = { document: documentText, spans: spans.map(({ start, end }) => ({ start, end })) };
    jobs.remember(job, `edit: ${spans.length} span${spans.length === 1 ? "" : "s"}`, context);
    attach(job.id, context);
  } catch (error) {
    showError("edit", error instanceof ApiError ? error.field : null, describeFailure(error), fieldTarget);
  } finally {
    $("edit-submit").disabled = false;
  }
}

async function cancel() {
  if (current) await jobview.cancel("edit", current.id, setStatus);
}

function accept() {
  if (!lastResult) return;
  $("edit-doc").value = lastResult.document;
  $("edit-spans").replaceChildren();
  $("edit-result-box").hidden = true;
  $("edit-doc").focus();
  showSelection();
  preview();
}

function download() {
  if (!lastResult) return;
  const link = el("a", { href: URL.createObjectURL(new Blob([lastResult.document], { type: "text/plain" })),
                         download: $("edit-file").dataset.fileName || "edited.txt" });
  document.body.append(link);
  link.click();
  link.remove();
}

async function openFile(event) {
  const [file] = event.target.files;
  if (!file) return;
  $("edit-doc").value = await file.text();
  $("edit-spans").replaceChildren();
  $("edit-file").dataset.fileName = file.name;
  preview();
}

export function init(defaults) {
  buildKnobs("edit", defaults, ["max_new_tokens"]);
  const area = $("edit-doc");
  for (const name of ["select", "keyup", "mouseup", "input"]) area.addEventListener(name, showSelection);
  area.addEventListener("input", preview);
  $("edit-add-span").addEventListener("click", () => {
    const { start, end } = selection();
    addSpan(start, end);
  });
  $("edit-add-empty").addEventListener("click", () => addSpan(null, null).querySelector(".span-start").focus());
  $("edit-file").addEventListener("change", openFile);
  $("edit-form").addEventListener("submit", submit);
  $("edit-cancel").addEventListener("click", cancel);
  $("edit-accept").addEventListener("click", accept);
  $("edit-download").addEventListener("click", download);
  showSelection();
  preview();
}
