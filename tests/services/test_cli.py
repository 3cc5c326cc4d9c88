"""`dgserve` client commands against the API over real HTTP (in-process `main`, output captured)."""

from __future__ import annotations

import json
import sys

import httpx
import pytest
import redis

from services.cli import EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, main
from services.settings import REPO_ROOT
from tests.support.processes import free_port, running_process, wait_for_http

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
