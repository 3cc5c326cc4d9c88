"""`dgserve` client commands against the API over real HTTP (in-process `main`, output captured)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import redis

from services.cli import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, main
from services.settings import REPO_ROOT
from tests.support.processes import free_port, running_process, wait_for_http, wait_until

DRAFT = [("draft", {"canvas": 0, "step": 1, "text": "partial"})]


def test_generate_prints_the_result(start_api, capsys):
    api = start_api()
    worker = api.run_next_job(DRAFT, {"text": "a fine answer", "finish_reason": "stop"})
    code = main(["generate", "Say something", "--url", api.url, "--drafts", "--max-new-tokens", "16", "--seed", "4"])
    worker.join(timeout=10)
    out, err = capsys.readouterr()
    assert code == EXIT_OK and out.strip() == "a fine answer"
    assert "partial" in err  # the draft was shown while waiting
    job = api.store.get(api.redis.keys("job:*")[0].split(":")[1])
    assert job.request.max_new_tokens == 16 and job.request.seed == 4 and job.request.stream_drafts


def test_generate_reports_a_failed_job(start_api, capsys):
    api = start_api()
    worker = api.run_next_job(DRAFT, error=("engine_error", "out of memory"))
    code = main(["generate", "x", "--url", api.url])
    worker.join(timeout=10)
    assert code == EXIT_JOB_FAILED and "engine_error: out of memory" in capsys.readouterr().err


def test_edit_writes_the_file(start_api, tmp_path, capsys):
    api = start_api()
    source = tmp_path / "notes.txt"
    source.write_bytes(b"first line\r\nsecond line\r\n")
    new_document = "first line\r\nthird line\r\n"
    worker = api.run_next_job(DRAFT, {"document": new_document, "diff": "-second\n+third\n", "edits": []})
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


@pytest.mark.integration
def test_dgserve_api_serves_from_environment_settings(fresh_redis_url, tokenizer_model_dir, tmp_path):
    port = free_port()
    env = {"DGSERVE_REDIS_URL": fresh_redis_url, "DGSERVE_MODEL": str(tokenizer_model_dir),
           "DGSERVE_API_KEYS": "cli-test-key-1", "DGSERVE_MAX_PROMPT_TOKENS": "32"}
    with running_process([sys.executable, "-m", "services.cli", "api", "--port", str(port)], env=env,
                         log_path=tmp_path / "api.log", cwd=REPO_ROOT) as process:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz", timeout=60, process=process)
        auth = {"Authorization": "Bearer cli-test-key-1"}
        assert httpx.post(f"{base}/v1/jobs", json={"prompt": "hi"}).status_code == 401
        assert httpx.post(f"{base}/v1/jobs", json={"prompt": "x" * 40}, headers=auth).status_code == 422
        accepted = httpx.post(f"{base}/v1/jobs", json={"prompt": "hi"}, headers=auth)
        assert accepted.status_code == 202
        assert redis.Redis.from_url(fresh_redis_url).llen("dgemma.tiny-api") == 1


def _cli(args: list[str], env: dict[str, str] | None = None, ctrl_c: bool = False) -> subprocess.Popen:
    """The real `dgserve` command in a process of its own (stdout and stderr piped). `ctrl_c`: SIGINT acts
    as at a terminal even where the test run inherited it ignored (a shell's background job ignores it, and
    so would the command), by setting Python's own handler before the CLI's `main` runs."""
    command = [sys.executable, "-m", "services.cli", *args]
    if ctrl_c:
        command = [sys.executable, "-c", "import signal, sys; "
                   "signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "from services.cli import main; sys.exit(main())", *args]
    return subprocess.Popen(command, cwd=REPO_ROOT, text=True, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_generate_timeout_is_honoured_and_says_how_to_cancel(start_api):
    api = start_api()  # no worker: the job stays queued
    started = time.monotonic()
    cli = _cli(["generate", "never runs", "--url", api.url, "--timeout", "1"])
    out, err = cli.communicate(timeout=60)
    job_id = api.redis.keys("job:*:events")[0].split(":")[1]
    assert cli.returncode == EXIT_USAGE and time.monotonic() - started < 20, err
    assert "--timeout 1 s" in err and f"dgserve cancel {job_id}" in err and "Traceback" not in err
    assert api.store.get(job_id).status == "queued"  # the job was left alone


def test_ctrl_c_during_generate_prints_no_traceback(start_api):
    api = start_api()
    cli = _cli(["generate", "wait for me", "--url", api.url], ctrl_c=True)
    wait_until(lambda: bool(api.redis.keys("job:*:events")), 30, what="the job to be submitted")
    time.sleep(0.5)  # the CLI is now following the job's events
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=30)
    job_id = api.redis.keys("job:*:events")[0].split(":")[1]
    assert cli.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"dgserve cancel {job_id}" in err


def test_connection_refused_names_the_url_and_suggests_up(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "some-job", "--url", url]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert url in err and "dgserve up" in err and len(err.strip().splitlines()) == 1, err


def test_edit_of_a_non_utf8_file_is_one_line_and_submits_nothing(start_api, tmp_path, capsys):
    api = start_api()
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes("name = 'café'\n".encode("latin-1"))
    assert main(["edit", str(latin1), "--find", "name", "--url", api.url]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not UTF-8" in err and str(latin1) in err and len(err.strip().splitlines()) == 1, err
    assert api.redis.keys("job:*") == []


@pytest.mark.parametrize("command", [["api"], ["up", "--port", "0"]])
def test_malformed_api_keys_setting_is_one_line(command, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DGSERVE_API_KEYS", "short")
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    assert main(command) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: invalid setting DGSERVE_API_KEYS") and len(err.strip().splitlines()) == 1, err
    assert "at least 8 characters" in err


def test_status_exit_code_follows_the_job(start_api, capsys):
    api = start_api()
    worker = api.run_next_job([], error=("engine_error", "out of memory"))
    job_id = api.http.post("/v1/jobs", json={"prompt": "p"}).json()["id"]
    worker.join(timeout=10)
    assert main(["status", job_id, "--url", api.url]) == EXIT_JOB_FAILED
    assert f"{job_id} generate failed" in capsys.readouterr().out
    queued = api.http.post("/v1/jobs", json={"prompt": "q"}).json()["id"]
    assert main(["status", queued, "--url", api.url]) == EXIT_OK


def test_cancel_of_a_running_job_says_it_was_requested(start_api, capsys):
    api = start_api()
    job_id = api.http.post("/v1/jobs", json={"prompt": "p"}).json()["id"]
    api.store.try_start(job_id, "some-worker")
    assert main(["cancel", job_id, "--url", api.url]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"cancel requested for job {job_id} (running)" in out, out
    assert api.store.is_cancel_requested(job_id)


def test_progress_is_plain_text_when_not_a_terminal(start_api, capsys):
    api = start_api()
    worker = api.run_next_job(DRAFT + [("canvas", {"canvas": 0, "step": 2, "text": "x"})], {"text": "done"})
    assert main(["generate", "p", "--url", api.url, "--drafts"]) == EXIT_OK
    worker.join(timeout=10)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err, repr(err)
    assert "[canvas 0 step 1] partial" in err.splitlines()


def test_edit_diff_is_labelled_with_the_file_name(start_api, tmp_path, capsys):
    api = start_api()
    source = tmp_path / "module.py"
    source.write_text("a = 1\n")
    diff = "--- a/document\n+++ b/document\n@@ -1 +1 @@\n-a = 1\n+a = 2\n"
    worker = api.run_next_job([], {"document": "a = 2\n", "diff": diff, "edits": []})
    assert main(["edit", str(source), "--find", "1", "--url", api.url]) == EXIT_OK
    worker.join(timeout=10)
    out = capsys.readouterr().out
    assert out.startswith(f"--- a/{source}\n+++ b/{source}\n@@ -1 +1 @@"), out
    assert source.read_text() == "a = 1\n"  # no --write: the file is untouched
