// Form pieces shared by the generate and edit views: the diffusion knobs, and errors shown where they
// happen (a 422 names its field; the message goes next to that field's control).

import { $, el } from "./util.js";

// name, label, integer?  (docs/api.md: the generate job's knobs)
export const KNOBS = [
  ["max_new_tokens", "max new tokens", true],
  ["max_denoising_steps", "max denoising steps", true],
  ["entropy_bound", "entropy bound", false],
  ["t_min", "t min", false],
  ["t_max", "t max", false],
  ["confidence_threshold", "confidence threshold", false],
  ["stability_threshold", "stability threshold", true],
  ["seed", "seed", true],
];

/** Build the knob inputs of one form, starting at the served model's defaults. */
export function buildKnobs(prefix, defaults, skip = []) {
  const grid = $(`${prefix}-knobs`);
  for (const [name, label, integer] of KNOBS) {
    if (skip.includes(name)) continue;
    const id = `${prefix}-knob-${name}`;
    const input = el("input", { id, name, type: "number", step: integer ? "1" : "any", inputmode: integer ? "numeric" : "decimal",
                                "aria-describedby": `${id}-error` });
    if (defaults[name] !== undefined) input.value = String(defaults[name]);
    else input.placeholder = name === "seed" ? "random" : "model default";
    grid.append(el("div", { class: "knob" }, el("label", { for: id, text: label }), input,
                   el("p", { class: "field-error", id: `${id}-error`, role: "alert" })));
  }
}

/** The knobs that have a value, as numbers (an empty box means "the model's default"). */
export function readKnobs(prefix) {
  const values = {};
  for (const [name] of KNOBS) {
    const input = $(`${prefix}-knob-${name}`);
    if (!input) continue;
    const text = input.value.trim();
    if (text !== "") values[name] = Number(text);
  }
  return values;
}

export function clearErrors(form) {
  for (const node of form.querySelectorAll(".field-error, .form-error")) node.textContent = "";
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

/**
 * Show `message` next to the control of `field` ("max_new_tokens", "edits[1].max_tokens", "prompt", ...):
 * `resolveField(field)` returns {error: <p>, control: <input>?} or null; unknown fields go to the form's
 * general error line. Returns the node the message went to.
 */
export function showError(formPrefix, field, message, resolveField) {
  const target = (field && resolveField(field)) || null;
  const node = target ? target.error : $(`${formPrefix}-form-error`);
  node.textContent = message;
  if (target && target.control) {
    target.control.setAttribute("aria-invalid", "true");
    target.control.focus();
  }
  return node;
}

/** Knob fields resolve to their own inputs; `field` may carry a path such as `t_min`. */
export function knobTarget(prefix, field) {
  const name = field.split(/[.[]/)[0];
  const control = $(`${prefix}-knob-${name}`);
  return control ? { error: $(`${prefix}-knob-${name}-error`), control } : null;
}

/** Describe a failure of a request for a form: ApiError (with Retry-After) or a network error. */
export function describeFailure(error) {
  if (error && typeof error.describe === "function") return error.describe();
  return `the API could not be reached (${error && error.message ? error.message : error})`;
}
