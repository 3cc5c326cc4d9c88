// The public job API, as any client uses it: JSON requests with the user's API key, and each job's
// Server-Sent Events read through a streamed fetch (EventSource cannot send an Authorization header),
// resumed with Last-Event-ID after a lost connection.

const KEY_STORAGE = "dgserve.playground.apiKey";
const TERMINAL_EVENTS = new Set(["done", "failed", "cancelled", "expired"]);
const MAX_RECONNECTS = 20;

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** A non-2xx answer in the API's one error shape: {error: {code, message, field?}} (+ Retry-After). */
export class ApiError extends Error {
  constructor(status, code, message, field, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
    this.retryAfter = retryAfter;
  }

  describe() {
    const wait = this.retryAfter ? ` Retry after ${this.retryAfter} s.` : "";
    return `${this.status} ${this.code}: ${this.message}${wait}`;
  }
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = (body && body.error) || {};
  return new ApiError(response.status, error.code || `http_${response.status}`,
                      error.message || response.statusText || "request failed", error.field,
                      response.headers.get("Retry-After"));
}

/** JSON request to the API; resolves to the parsed body, rejects with ApiError (or a TypeError offline). */
export async function request(method, path, body) {
  const headers = authHeaders(body === undefined ? {} : { "Content-Type": "application/json" });
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/**
 * A GET that rides out a brief outage of the API or its Redis (a network error or a 5xx), as the event
 * stream does: a job's result is read right after its `done` event, which an API that is shutting down
 * may still deliver just before it stops answering. Other refusals (4xx) are thrown at once.
 */
export async function getWithRetry(path, signal, attempts = 20) {
  for (let attempt = 0; ; attempt += 1) {
    let response = null;
    try {
      response = await fetch(path, { headers: authHeaders(), signal });
    } catch (error) {
      if ((signal && signal.aborted) || attempt + 1 >= attempts) throw error;
    }
    if (response !== null) {
      if (response.ok) return response.json();
      const error = await errorOf(response);
      if (response.status < 500 || attempt + 1 >= attempts) throw error;
    }
    await sleep(Math.min(250 * 2 ** attempt, 5000));
  }
}

/** The Prometheus text of /metrics (may need the key on deployments that protect it). */
export async function metricsText() {
  const response = await fetch("/metrics", { headers: authHeaders() });
  if (!response.ok) throw await errorOf(response);
  return response.text();
}

/** /readyz: its JSON body for both 200 and 503 (503 is an answer, not a failure). */
export async function readiness() {
  const response = await fetch("/readyz", { headers: authHeaders() });
  return response.json();
}

/** Split an SSE byte stream into frames: {id, event, data}. Comments (keep-alives) are skipped. */
function parseFrame(block) {
  const frame = { id: null, event: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "id") frame.id = value;
    else if (name === "event") frame.event = value;
    else if (name === "data") frame.data += value;
  }
  return frame.data ? frame : null;
}

async function readStream(response, lastId, onEvent, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return { lastId, finished: false };
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = parseFrame(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (!frame || signal.aborted) continue;
      if (frame.id) lastId = frame.id;
      onEvent(frame.event, JSON.parse(frame.data), frame.id);
      if (TERMINAL_EVENTS.has(frame.event)) {
        reader.cancel().catch(() => {});
        return { lastId, finished: true };
      }
    }
  }
}

/**
 * Follow a job's events until a terminal one. `onEvent(type, data, id)` for each; `onConnection(state)`
 * with "open", "reconnecting" or "closed". A dropped connection is reopened with Last-Event-ID, so no
 * event is lost or repeated. Aborting `signal` stops following (the job itself keeps running).
 * Resolves to the last event id; rejects with ApiError for refusals (404 for another key's job).
 */
export async function followEvents(jobId, { onEvent, onConnection = () => {}, signal, lastEventId = null }) {
  let lastId = lastEventId;
  for (let attempt = 0; attempt <= MAX_RECONNECTS && !signal.aborted; attempt += 1) {
    let response;
    try {
      const headers = authHeaders(lastId ? { "Last-Event-ID": lastId } : {});
      response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
    } catch (error) {
      if (signal.aborted) break;
      onConnection("reconnecting");
      await sleep(Math.min(500 * 2 ** attempt, 5000));
      continue;
    }
    if (response.status >= 500) { // the API or its Redis is briefly unavailable (503 + Retry-After): retry
      const error = await errorOf(response);
      onConnection("reconnecting");
      await sleep(Math.min(1000 * (Number(error.retryAfter) || 2 ** attempt), 5000));
      continue;
    }
    if (!response.ok) throw await errorOf(response);
    onConnection("open");
    try {
      const outcome = await readStream(response, lastId, onEvent, signal);
      lastId = outcome.lastId;
      if (outcome.finished) break;
    } catch (error) {
      if (signal.aborted) break;
      if (error instanceof SyntaxError) throw error;
    }
    if (signal.aborted) break;
    onConnection("reconnecting");
    await sleep(Math.min(250 * 2 ** attempt, 5000));
  }
  onConnection("closed");
  return lastId;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
