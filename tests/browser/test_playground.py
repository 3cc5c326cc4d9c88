"""The playground page in headless Chromium against the real stack (tests/browser/conftest.py).

Every test drives the page as a person would (typing, clicking, reloading) and checks what the page shows
against what the API itself answers for the same job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import API_KEY, JOBS_PER_MINUTE_PER_KEY, OTHER_KEY, BrowserStack, open_page
from tests.integration.conftest import read_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT_MS = 180_000
# A job that runs for minutes on the embedded model (64 canvases of 32 steps): long enough to cancel it, or to
# reload the page while it runs, without any sleep.
LONG_JOB_TOKENS = "2048"
# Records every distinct text the live draft shows (a MutationObserver sees each DOM update, however fast).
WATCH_DRAFTS = """() => {
  window.__drafts = [];
  const draft = document.getElementById("gen-draft");
  const resultBox = document.getElementById("gen-result-box");
  new MutationObserver(() => {
    const text = draft.textContent;
    const last = window.__drafts[window.__drafts.length - 1];
    if (!text || (last && last.text === text)) return;
    window.__drafts.push({text, marks: draft.querySelectorAll("mark.changed").length, resultShown: !resultBox.hidden});
  }).observe(draft, {childList: true, subtree: true, characterData: true});
}"""
EDIT_DOCUMENT = """# café ☕ 🚀 helpers
def add(a, b):
    return a - b


def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
"""


def newest_job_id(page: Any) -> str:
    return page.locator("#job-list li[data-job-id]").first.get_attribute("data-job-id")


def wait_for_status(page: Any, view: str, status: str, timeout: int = JOB_TIMEOUT_MS) -> None:
    try:
        page.wait_for_function(f"document.getElementById('{view}-status').textContent === '{status}'",
                               timeout=timeout)
    except Exception as err:  # say what the page shows instead, for the log
        shown = page.evaluate(f"['status', 'conn', 'draft-count'].map(k => {{"
                              f"const n = document.getElementById('{view}-' + k); return n && n.textContent; }})")
        raise AssertionError(f"{view} status never became {status!r}; the page shows {shown}") from err


def wait_for_drafts(page: Any, view: str, at_least: int) -> None:
    page.wait_for_function(f"Number(document.getElementById('{view}-draft-count').textContent) >= {at_least}",
                           timeout=JOB_TIMEOUT_MS)


def start_long_generate(page: Any) -> str:
    page.fill("#gen-prompt", "import os\n")
    page.fill("#gen-knob-max_new_tokens", LONG_JOB_TOKENS)
    page.click("#gen-submit")
    wait_for_drafts(page, "gen", 2)
    return newest_job_id(page)


def test_generate_shows_distinct_drafts_then_the_apis_result(page: Any, browser_stack: BrowserStack,
                                                              screenshot_dir: Path) -> None:
    page.goto("/")
    assert page.text_content("#model-name") == "dgtiny"
    # The knobs start at the served model's generation_config.json defaults.
    assert page.input_value("#gen-knob-max_new_tokens") == "128"
    assert page.input_value("#gen-knob-max_denoising_steps") == "32"
    page.evaluate(WATCH_DRAFTS)
    page.fill("#gen-prompt", "def fibonacci(n):")
    page.fill("#gen-knob-max_new_tokens", "96")
    page.fill("#gen-knob-seed", "7")
    page.click("#gen-submit")
    # Mid-denoise of the second canvas: the first one committed above it, the second still changing.
    page.wait_for_function("Number(document.getElementById('gen-canvas').textContent) >= 2 && "
                           "Number(document.getElementById('gen-step').textContent) >= 3", timeout=JOB_TIMEOUT_MS)
    page.screenshot(path=str(screenshot_dir / "playground-generate.png"))
    wait_for_status(page, "gen", "succeeded")
    page.wait_for_selector("#gen-result-box:not([hidden])")

    drafts = page.evaluate("window.__drafts")
    before_result = {draft["text"] for draft in drafts if not draft["resultShown"]}
    assert len(before_result) >= 2, drafts
    assert any(draft["marks"] > 0 for draft in drafts), "no step highlighted the positions it changed"
    with browser_stack.client() as client:
        job = client.get(f"/v1/jobs/{newest_job_id(page)}").json()
    assert job["status"] == "succeeded"
    assert page.text_content("#gen-result") == job["result"]["text"]
    assert page.locator("#gen-committed pre.committed").count() == job["result"]["usage"]["canvases"] == 3
    assert str(job["result"]["usage"]["generated_tokens"]) in page.text_content("#gen-stats")


def select_in_editor(page: Any, text: str) -> None:
    """Select `text` in the document as a mouse drag would (selection range + select event)."""
    page.evaluate("""(needle) => {
      const area = document.getElementById("edit-doc");
      const start = area.value.indexOf(needle);
      area.focus();
      area.setSelectionRange(start, start + needle.length);
      area.dispatchEvent(new Event("select"));
    }""", text)


def test_two_span_edit_of_a_multiline_document(page: Any, browser_stack: BrowserStack, screenshot_dir: Path) -> None:
    page.goto("/")
    page.click("#tab-edit")
    page.set_input_files("#edit-file", files=[{"name": "helpers.py", "mimeType": "text/x-python",
                                               "buffer": EDIT_DOCUMENT.encode("utf-8")}])
    page.wait_for_function("document.getElementById('edit-doc').value.startsWith('# caf')")
    assert page.input_value("#edit-doc") == EDIT_DOCUMENT
    first, second = "a - b", "total / len(values)"
    select_in_editor(page, first)
    page.click("#edit-add-span")
    # Offsets are code points (the API's), not the editor's UTF-16 units: the emoji above makes them differ.
    assert page.input_value("#edit-spans tr:nth-child(1) .span-start") == str(EDIT_DOCUMENT.index(first))
    page.fill("#edit-spans tr:nth-child(1) .span-instruction", "fix the bug")
    page.fill("#edit-spans tr:nth-child(1) .span-max-tokens", "8")
    page.click("#edit-add-empty")  # the second span by typed offsets
    start = EDIT_DOCUMENT.index(second)
    page.fill("#edit-spans tr:nth-child(2) .span-start", str(start))
    page.fill("#edit-spans tr:nth-child(2) .span-end", str(start + len(second)))
    assert page.text_content("#edit-spans tr:nth-child(2) .span-text") == second
    page.click("#edit-form details.knobs summary")  # the knobs start folded in the edit view
    page.fill("#edit-knob-seed", "3")
    page.click("#edit-submit")
    wait_for_status(page, "edit", "succeeded")
    page.wait_for_selector("#edit-result-box:not([hidden])")
    page.screenshot(path=str(screenshot_dir / "playground-edit.png"), full_page=True)

    with browser_stack.client() as client:
        job = client.get(f"/v1/jobs/{newest_job_id(page)}").json()
    result = job["result"]
    assert page.text_content("#edit-result") == result["document"]
    assert page.text_content("#edit-live") == result["document"]
    assert page.text_content("#edit-diff").rstrip("\n") == result["diff"].rstrip("\n")
    assert int(page.text_content("#edit-draft-count")) > 0
    # Text outside the two spans is unchanged, byte for byte.
    edits = sorted(result["edits"], key=lambda edit: edit["original_start"])
    assert [(e["original_start"], e["original_end"]) for e in edits] == [
        (EDIT_DOCUMENT.index(first), EDIT_DOCUMENT.index(first) + len(first)), (start, start + len(second))]
    old_cursor = new_cursor = 0
    for edit in edits:
        assert result["document"][new_cursor:edit["start"]] == EDIT_DOCUMENT[old_cursor:edit["original_start"]]
        old_cursor, new_cursor = edit["original_end"], edit["end"]
    assert result["document"][new_cursor:] == EDIT_DOCUMENT[old_cursor:]

    with page.expect_download() as download:
        page.click("#edit-download")
    assert Path(download.value.path()).read_text(encoding="utf-8") == result["document"]
    assert download.value.suggested_filename == "helpers.py"
    page.click("#edit-accept")  # the next edit continues from the result
    assert page.input_value("#edit-doc") == result["document"]
    assert page.locator("#edit-spans tr").count() == 0


def test_cancel_stops_a_running_job(page: Any, browser_stack: BrowserStack) -> None:
    page.goto("/")
    job_id = start_long_generate(page)
    page.click("#gen-cancel")
    wait_for_status(page, "gen", "cancelled", timeout=60_000)
    with browser_stack.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    page.wait_for_selector(f'#job-list li[data-job-id="{job_id}"] .badge.cancelled')
    assert page.is_disabled("#gen-cancel")


def test_a_422_is_shown_next_to_its_field(page: Any, browser_stack: BrowserStack) -> None:
    page.goto("/")
    page.fill("#gen-knob-max_new_tokens", "999999")
    page.click("#gen-submit")
    error = page.locator("#gen-knob-max_new_tokens-error")
    error.wait_for()
    assert "422" in error.text_content() and "max_new_tokens" in error.text_content()
    assert page.get_attribute("#gen-knob-max_new_tokens", "aria-invalid") == "true"
    assert page.text_content("#gen-form-error") == ""

    page.fill("#gen-knob-max_new_tokens", "32")
    page.fill("#gen-knob-t_min", "0.9")
    page.fill("#gen-knob-t_max", "0.5")
    page.click("#gen-submit")
    page.locator("#gen-knob-t_max-error").wait_for()  # the API blames t_max when both are given
    assert "t_max" in page.text_content("#gen-knob-t_max-error")
    assert page.get_attribute("#gen-knob-t_max", "aria-invalid") == "true"
    assert page.get_attribute("#gen-knob-max_new_tokens", "aria-invalid") is None  # the old error is gone

    page.click("#tab-edit")
    page.click("#edit-add-empty")
    page.fill("#edit-spans tr:nth-child(1) .span-start", "5")
    page.fill("#edit-spans tr:nth-child(1) .span-end", "100000")
    page.click("#edit-submit")
    row_error = page.locator("#edit-spans tr:nth-child(1) .field-error")
    row_error.wait_for()
    assert "edits[0]" in row_error.text_content() and "outside the document" in row_error.text_content()
    # Nothing was accepted, so nothing is listed.
    assert page.locator("#job-list li[data-job-id]").count() == 0


def test_reload_reattaches_to_the_running_job(page: Any, browser_stack: BrowserStack) -> None:
    page.goto("/")
    job_id = start_long_generate(page)
    page.reload()
    page.wait_for_function(f"document.getElementById('gen-status').dataset.jobId === '{job_id}'")
    wait_for_status(page, "gen", "running")
    wait_for_drafts(page, "gen", 2)  # the replay and then the live stream feed the view again
    seen = int(page.text_content("#gen-draft-count"))
    wait_for_drafts(page, "gen", seen + 3)  # and it keeps following new steps
    assert page.locator(f'#job-list li[data-job-id="{job_id}"] .badge.running').count() == 1
    page.click("#gen-cancel")
    wait_for_status(page, "gen", "cancelled", timeout=60_000)


def test_metrics_panel_shows_throughput_after_jobs_ran(page: Any, browser_stack: BrowserStack) -> None:
    page.goto("/")
    page.wait_for_function("document.getElementById('svc-ready').textContent === 'ready'")
    assert page.text_content("#svc-workers") == "1"
    with browser_stack.client() as client:  # a job from another client: the panel shows the service, not the page
        response = client.post("/v1/jobs", json={"prompt": "class Stack:", "max_new_tokens": 160})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        page.wait_for_function("Number(document.getElementById('svc-tps-minute').dataset.value) > 0",
                               timeout=JOB_TIMEOUT_MS)
        points = page.get_attribute("#svc-plot polyline", "points")
        assert points and len(points.split()) >= 2
        assert "cpu" in page.text_content("#svc-memory")
        assert page.text_content("#svc-queue") in {"0", "1"}
        client.delete(f"/v1/jobs/{job_id}")


def test_the_page_with_api_keys_on(keyed_page: Any, browser_stack: BrowserStack) -> None:
    page = keyed_page
    page.goto("/playground")
    assert page.text_content("#api-key-help") == "this server needs a key"
    page.fill("#gen-knob-max_new_tokens", "64")
    page.click("#gen-submit")
    page.locator("#gen-form-error").wait_for()
    assert "401" in page.text_content("#gen-form-error")

    page.fill("#api-key", API_KEY)
    page.click("#api-key-save")
    page.check('input[name="gen-mode"][value="chat"]')  # chat messages this time (a system and a user turn)
    assert page.locator("#gen-messages li").count() == 2
    page.click("#gen-submit")
    wait_for_status(page, "gen", "succeeded")  # the events came through a streamed fetch with the header
    assert int(page.text_content("#gen-draft-count")) >= 2
    job_id = newest_job_id(page)
    with browser_stack.client(API_KEY, keyed=True) as owner, browser_stack.client(OTHER_KEY, keyed=True) as other:
        job = owner.get(f"/v1/jobs/{job_id}").json()
        assert page.text_content("#gen-result") == job["result"]["text"]
        assert other.get(f"/v1/jobs/{job_id}").status_code == 404
    # The key stays in this browser: after a reload the list of this key's jobs is still readable.
    page.reload()
    assert page.input_value("#api-key") == API_KEY
    page.wait_for_selector(f'#job-list li[data-job-id="{job_id}"] .badge.succeeded')


def test_a_lost_connection_resumes_with_last_event_id(page: Any, browser_stack: BrowserStack) -> None:
    page.goto("/")
    page.fill("#gen-prompt", "def parse(text):")
    page.fill("#gen-knob-max_new_tokens", "320")  # 10 canvases: still running when the API comes back
    page.click("#gen-submit")
    wait_for_drafts(page, "gen", 2)
    job_id = newest_job_id(page)
    page.evaluate("""() => {
      window.__connection = [];
      const node = document.getElementById("gen-conn");
      new MutationObserver(() => window.__connection.push(node.textContent)).observe(node, {childList: true});
    }""")
    browser_stack.api.restart(hard=True)  # the stream breaks; the worker keeps denoising meanwhile
    wait_for_status(page, "gen", "succeeded")
    assert any("reconnecting" in text for text in page.evaluate("window.__connection"))
    with browser_stack.client() as client:
        events = read_events(client, job_id, until={"done"})
        job = client.get(f"/v1/jobs/{job_id}").json()
    drafts = [data for kind, data in events if kind == "draft"]
    # Resumed after the last event it had: every draft shown exactly once, none lost, none repeated.
    assert int(page.text_content("#gen-draft-count")) == len(drafts)
    assert page.locator("#gen-committed pre.committed").count() == job["result"]["usage"]["canvases"]
    assert page.text_content("#gen-result") == job["result"]["text"]
    assert page.text_content("#gen-conn") == ""


def test_a_429_shows_its_retry_after(keyed_page: Any, browser_stack: BrowserStack) -> None:
    page = keyed_page
    page.goto("/")
    page.fill("#api-key", OTHER_KEY)
    page.click("#api-key-save")
    page.fill("#gen-knob-max_new_tokens", "32")
    for _ in range(JOBS_PER_MINUTE_PER_KEY + 1):
        page.click("#gen-submit")
        page.wait_for_function("!document.getElementById('gen-submit').disabled")
    error = page.text_content("#gen-form-error")
    assert "429 rate_limited" in error and "Retry after" in error, error
    assert page.locator("#job-list li[data-job-id]").count() == JOBS_PER_MINUTE_PER_KEY


def test_layout_fits_a_narrow_window_and_every_control_is_labelled(browser: Any, browser_stack: BrowserStack,
                                                                     screenshot_dir: Path) -> None:
    for page in open_page(browser, browser_stack.api_url, viewport={"width": 380, "height": 800}):
        page.goto("/")
        page.wait_for_function("document.getElementById('svc-ready').textContent !== 'checking…'")
        for tab in ("generate", "edit"):
            page.click(f"#tab-{tab}")
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), f"{tab} scrolls sideways"
            page.screenshot(path=str(screenshot_dir / f"playground-narrow-{tab}.png"))
        page.click("#edit-add-empty")
        unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, select, textarea, button")]
          .filter((node) => node.offsetParent !== null || node.type === "file")
          .filter((node) => !(node.labels && node.labels.length) && !node.getAttribute("aria-label")
                            && !(node.tagName === "BUTTON" && node.textContent.trim()))
          .map((node) => node.id || node.outerHTML.slice(0, 80))""")
        assert unlabelled == []
        # The tabs work from the keyboard: arrow keys move between them.
        page.focus("#tab-edit")
        page.keyboard.press("ArrowLeft")
        assert page.is_visible("#panel-generate") and page.is_hidden("#panel-edit")
        assert page.evaluate("document.activeElement.id") == "tab-generate"
