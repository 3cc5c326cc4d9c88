"""The seams between API, store, Celery and worker stay simple (issue 11): one module publishes job messages,
reading a job does not re-validate its request, and the repository cites only its own files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.job_messages import RUN_JOB_TASK
from worker.celery_app import TASK_NAME

ROOT = Path(__file__).resolve().parents[2]


def tracked_files(*patterns: str) -> list[Path]:
    names = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=60).stdout.split()
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def test_one_module_publishes_job_messages_and_names_the_task():
    assert TASK_NAME == RUN_JOB_TASK  # the worker consumes the name the API publishes
    publishers = [name for name in (path.relative_to(ROOT).as_posix() for path in tracked_files("*.py"))
                  if not name.startswith("tests/") and "send_task(" in (ROOT / name).read_text(encoding="utf-8")]
    assert publishers == ["services/job_messages.py"]
    task_names = [path.relative_to(ROOT).as_posix() for path in tracked_files("services/*.py", "worker/*.py")
                  if '"dgserve.run_job"' in path.read_text(encoding="utf-8")]
    assert task_names == ["services/job_messages.py"]


def test_reading_a_job_does_not_parse_its_request(start_api):
    api = start_api()
    response = api.http.post("/v1/jobs", json={"prompt": "hi"})
    job_id = response.json()["id"]
    # A payload this version refuses (say, written by another one): status, events and cancel still work,
    # and only the worker, which needs the request, sees the error.
    api.redis.hset(f"job:{job_id}", "payload", '{"prompt": "hi", "retired_field": 1}')
    assert api.http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    with api.http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        assert events.status_code == 200
    assert api.http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    with pytest.raises(ValidationError, match="retired_field"):
        _ = api.store.get(job_id).request


def test_no_file_cites_paths_outside_the_repository():
    citing = [path.relative_to(ROOT).as_posix() for path in tracked_files()
              if path.suffix in {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".txt", ""}
              and "../shared" in path.read_text(encoding="utf-8", errors="replace")
              and path.name != "test_seams.py"]
    assert citing == []
