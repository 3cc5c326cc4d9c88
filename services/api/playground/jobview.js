// What the generate and edit views share about the one job each of them shows: following its events into the
// view (status line, connection line, cancel button), reading its result at the end, and cancelling it.
// A view's elements are named `<prefix>-status`, `<prefix>-conn`, `<prefix>-cancel`, `<prefix>-form-error`.

import { followEvents, request } from "./api.js";
import { describeFailure } from "./forms.js";
import * as jobs from "./jobs.js";
import { $ } from "./util.js";

/**
 * Follow job `jobId` until its stream ends, then show its result.
 * `view` is {prefix, controller, isCurrent(), setStatus(text), onEvent(type, data), showResult(jobId)}: events
 * and results of a job the view has since left (its controller aborted) change nothing.
 */
export async function follow(jobId, view) {
  const { prefix, controller } = view;
  view.setStatus("connecting");
  $(`${prefix}-status`).dataset.jobId = jobId;
  $(`${prefix}-cancel`).disabled = false;
  const onConnection = (state) => {
    if (view.isCurrent()) $(`${prefix}-conn`).textContent = state === "reconnecting" ? "connection lost: reconnecting…" : "";
  };
  try {
    await followEvents(jobId, { signal: controller.signal, onEvent: view.onEvent, onConnection });
    if (!controller.signal.aborted) await view.showResult(jobId);
  } catch (error) {
    if (!controller.signal.aborted) view.setStatus(describeFailure(error));
  } finally {
    if (view.isCurrent()) $(`${prefix}-cancel`).disabled = true;
  }
}

/** Ask the API to cancel `jobId`, shown in the view named `prefix`; a failure is written under its form. */
export async function cancel(prefix, jobId, setStatus) {
  try {
    const job = await request("DELETE", `/v1/jobs/${encodeURIComponent(jobId)}`);
    // The `cancelled` event may already have arrived; only a job still running waits for its next step.
    if (!jobs.isFinished($(`${prefix}-status`).textContent)) setStatus(job.status === "cancelled" ? "cancelled" : "cancel requested");
  } catch (error) {
    $(`${prefix}-form-error`).textContent = describeFailure(error);
  }
}
