// Small helpers shared by the views: DOM, offsets in code points, draft diffs, formatting.

export const $ = (id) => document.getElementById(id);

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// The API counts offsets in Unicode code points (Python string indices); JavaScript strings count UTF-16
// units. These convert between the two so a selection that includes an emoji still names the right span.
export function toCodePoints(text, utf16Index) {
  return Array.from(text.slice(0, utf16Index)).length;
}

export function toUtf16(text, codePointIndex) {
  let units = 0;
  let points = 0;
  for (const char of text) {
    if (points === codePointIndex) break;
    units += char.length;
    points += 1;
  }
  return units;
}

export function codePointLength(text) {
  return Array.from(text).length;
}

export function sliceCodePoints(text, start, end) {
  return text.slice(toUtf16(text, start), toUtf16(text, end));
}

// Drafts arrive as decoded text, so "positions that changed" are found by diffing the pieces (words,
// spaces, punctuation) of this step's draft against the previous one's: longest common subsequence, small
// inputs (a canvas is at most a few hundred pieces).
const PIECE = /\s+|[A-Za-z0-9_]+|[^\sA-Za-z0-9_]/gu;

export function pieces(text) {
  return text.match(PIECE) || [];
}

/** For each piece of `next`, whether it is new relative to `previous` (not part of their LCS). */
export function changedPieces(previous, next) {
  const a = pieces(previous);
  const b = pieces(next);
  if (a.length * b.length > 400000) return { parts: b, changed: b.map(() => true) };
  const rows = a.length + 1;
  const cols = b.length + 1;
  const table = new Uint16Array(rows * cols);
  for (let i = a.length - 1; i >= 0; i -= 1) {
    for (let j = b.length - 1; j >= 0; j -= 1) {
      table[i * cols + j] = a[i] === b[j] ? table[(i + 1) * cols + j + 1] + 1
        : Math.max(table[(i + 1) * cols + j], table[i * cols + j + 1]);
    }
  }
  const changed = new Array(b.length).fill(true);
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    if (a[i] === b[j]) {
      changed[j] = false;
      i += 1;
      j += 1;
    } else if (table[(i + 1) * cols + j] >= table[i * cols + j + 1]) i += 1;
    else j += 1;
  }
  return { parts: b, changed };
}

/** Render `next` into `node`, with the pieces that changed since `previous` in <mark>. */
export function renderDraft(node, previous, next) {
  const { parts, changed } = changedPieces(previous, next);
  const fragment = document.createDocumentFragment();
  let plain = "";
  parts.forEach((part, index) => {
    if (!changed[index] || !part.trim()) {
      plain += part;
      return;
    }
    if (plain) fragment.append(plain);
    plain = "";
    fragment.append(el("mark", { class: "changed", text: part }));
  });
  if (plain) fragment.append(plain);
  node.replaceChildren(fragment);
}

export function formatSeconds(seconds) {
  return typeof seconds === "number" ? `${seconds.toFixed(2)} s` : "–";
}

export function formatBytes(bytes) {
  if (!Number.isFinite(bytes) || bytes <= 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value >= 10 ? 0 : 1)} ${units[unit]}`;
}

/** Fill a <dl> with [term, value] pairs. */
export function fillStats(node, pairs) {
  node.replaceChildren(...pairs.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: String(value) })]));
}

/** The job's timings and usage as [term, value] pairs for a stats list. */
export function jobStats(job) {
  const usage = (job.result && job.result.usage) || {};
  const timings = job.timings || {};
  const pairs = [["status", job.status], ["queue", formatSeconds(timings.queue_seconds)],
                 ["run", formatSeconds(timings.run_seconds)]];
  for (const [name, value] of Object.entries(usage)) pairs.push([name.replace(/_/g, " "), value]);
  if (job.result && job.result.finish_reason) pairs.push(["finish reason", job.result.finish_reason]);
  if (usage.generated_tokens && timings.run_seconds) {
    pairs.push(["tokens/s", (usage.generated_tokens / timings.run_seconds).toFixed(1)]);
  }
  return pairs;
}
