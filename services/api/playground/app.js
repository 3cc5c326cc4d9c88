// Entry point of the playground: configuration from the page, the API key field, tabs, and the views.
// After a reload, the newest queued or running job of each kind is reattached to its view.

import { apiKey, setApiKey } from "./api.js";
import * as edit from "./edit.js";
import * as generate from "./generate.js";
import * as jobs from "./jobs.js";
import * as service from "./service.js";
import { $ } from "./util.js";

function config() {
  try {
    return JSON.parse($("dgserve-config").textContent);
  } catch {
    return { model: "?", defaults: {}, authEnabled: false };
  }
}

function selectTab(name, focus = false) {
  for (const kind of ["generate", "edit"]) {
    const tab = $(`tab-${kind}`);
    const active = kind === name;
    tab.setAttribute("aria-selected", String(active));
    tab.tabIndex = active ? 0 : -1;
    $(`panel-${kind}`).hidden = !active;
    if (active && focus) tab.focus();
  }
}

function initTabs() {
  const order = ["generate", "edit"];
  for (const kind of order) {
    const tab = $(`tab-${kind}`);
    tab.addEventListener("click", () => selectTab(kind));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      event.preventDefault();
      selectTab(order[(order.indexOf(kind) + step + order.length) % order.length], true);
    });
  }
}

function initKey(settings) {
  const input = $("api-key");
  input.value = apiKey();
  const help = $("api-key-help");
  help.textContent = settings.authEnabled && !apiKey() ? "this server needs a key" : "";
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    setApiKey(input.value.trim());
    help.textContent = input.value.trim() ? "key saved in this browser" : "key cleared";
    jobs.render();
    await reattach();
  });
}

function open(entry) {
  selectTab(entry.kind);
  if (entry.kind === "edit") edit.attach(entry.id, entry.context);
  else generate.attach(entry.id);
}

/** Reattach each view to the newest job of its kind that is still queued or running. */
async function reattach() {
  const running = (await jobs.refresh()).filter((job) => !jobs.isFinished(job.status));
  for (const kind of ["edit", "generate"]) {
    const entry = running.find((job) => job.kind === kind);
    if (entry && kind === "edit") edit.attach(entry.id, entry.context);
    else if (entry) generate.attach(entry.id);
  }
  if (running.length) selectTab(running[0].kind); // the newest one's view
}

function main() {
  const settings = config();
  $("model-name").textContent = settings.model;
  initTabs();
  initKey(settings);
  generate.init(settings.defaults || {});
  edit.init(settings.defaults || {});
  jobs.onOpen(open);
  jobs.render();
  service.init();
  reattach();
  setInterval(jobs.refresh, 5000);
}

main();
