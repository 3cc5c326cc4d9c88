"""`dgserve` client commands against the API over real HTTP (in-process `main`, output captured)."""

from __future__ import annotations

import json
import threading
import time

from services.cli import EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, main


def run_worker_for_next_job(api, result: dict | None, error: tuple[str, str] | None = None) -> threading.Thread:
    """Wait for the job the CLI submits, then run it through the real JobStore as a worker would."""
    def run():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not api.redis.keys("job:*"):
            time.sleep(0.02)
        job_id = api.redis.keys("job:*")[0].split(":")[1]
        time.sleep(0.1)
        api.store.try_start(job_id, "w")
        api.store.append_event(job_id, "draft", {"canvas": 0, "step": 1, "text": "partial"})
        if error:
            api.store.fail(job_id, *error)
        else:
            api.store.succeed(job_id, result)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_generate_prints_the_result(start_api, capsys):
    api = start_api()
    worker = run_worker_for_next_job(api, {"text": "a fine answer", "finish_reason": "stop"})
    code = main(["generate", "Say something", "--url", api.url, "--drafts", "--max-new-tokens", "16", "--seed", "4"])
    worker.join(timeout=10)
    out, err = capsys.readouterr()
    assert code == EXIT_OK and out.strip() == "a fine answer"
    assert "partial" in err  # the draft was shown while waiting
    job = api.store.get(api.redis.keys("job:*")[0].split(":")[1])
    assert job.request.max_new_tokens == 16 and job.request.seed == 4 and job.request.stream_drafts


def test_generate_reports_a_failed_job(start_api, capsys):
    api = start_api()
    worker = run_worker_for_next_job(api, None, error=("engine_error", "out of memory"))
    code = main(["generate", "x", "--url", api.url])
    worker.join(timeout=10)
    assert code == EXIT_JOB_FAILED and "engine_error: out of memory" in capsys.readouterr().err


def test_edit_writes_the_file(start_api, tmp_path, capsys):
    api = start_api()
    source = tmp_path / "notes.txt"
    source.write_bytes(b"first line\r\nsecond line\r\n")
    new_document = "first line\r\nthird line\r\n"
    worker = run_worker_for_next_job(api, {"document": new_document, "diff": "-second\n+third\n", "edits": []})
    code = main(["edit", str(source), "--find", "second", "--instruction", "count on", "--write", "--url", api.url])
    worker.join(timeout=10)
    assert code == EXIT_OK and source.read_bytes() == new_document.encode()
    job = api.store.get(api.redis.keys("job:*")[0].split(":")[1])
    assert job.kind == "edit" and job.request.edits[0].instruction == "count on"
    assert job.request.resolved_spans() == [(12, 18)]


def test_status_cancel_and_errors(start_api, capsys):
    api = start_api()
    job_id = api.http.post("/v1/jobs", json={"prompt": "p"}).json()["id"]
    assert main(["status", job_id, "--url", api.url]) == EXIT_OK
    assert f"{job_id} generate queued" in capsys.readouterr().out
    assert main(["cancel", job_id, "--url", api.url, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert main(["cancel", job_id, "--url", api.url]) == EXIT_USAGE
    assert "already finished" in capsys.readouterr().err
    assert main(["status", "unknown-id", "--url", api.url]) == EXIT_USAGE
    source = api.settings.model  # any existing path will do for a bad --span
    assert main(["edit", f"{source}/tokenizer.json", "--span", "3-4", "--url", api.url]) == EXIT_USAGE
    assert "START:END" in capsys.readouterr().err
