"""Reading, cancelling and following jobs over real HTTP; auth; SSE resume with Last-Event-ID."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.services.api_keys import KEY_A, KEY_B


def parse_sse(text: str) -> list[dict]:
    """Frames with an `event` (comments and the retry hint dropped)."""
    frames = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            frames.append({"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])})
    return frames


def submit(api, **extra) -> str:
    response = api.http.post("/v1/jobs", json={"prompt": "hi", **extra.pop("body", {})}, **extra)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_unknown_job_is_404_in_the_error_shape(start_api):
    api = start_api()
    for method, path in [("GET", "/v1/jobs/nope"), ("DELETE", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events")]:
        response = api.http.request(method, path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_auth_missing_key_401_and_other_keys_jobs_are_404(start_api):
    api = start_api(api_keys=f"{KEY_A},{KEY_B}")
    missing = api.http.post("/v1/jobs", json={"prompt": "hi"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = api.http.get("/v1/jobs/x", headers={"Authorization": "Bearer not-a-key-123"})
    assert wrong.status_code == 401
    as_a, as_b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    job_id = submit(api, headers=as_a)
    assert api.http.get(f"/v1/jobs/{job_id}", headers=as_a).status_code == 200
    assert api.http.get(f"/v1/jobs/{job_id}", headers=as_b).status_code == 404
    assert api.http.delete(f"/v1/jobs/{job_id}", headers=as_b).status_code == 404
    assert api.http.get(f"/v1/jobs/{job_id}/events", headers=as_b).status_code == 404
    assert api.store.get(job_id).status == "queued"  # B's DELETE did nothing
    assert KEY_A not in json.dumps(api.redis.hgetall(f"job:{job_id}"))  # only the hash is stored
    assert api.queue_length() == 1


def test_cancel_queued_job_then_409(start_api):
    api = start_api()
    job_id = submit(api)
    cancelled = api.http.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    again = api.http.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert api.store.try_start(job_id, "w").outcome == "already_finished"  # the worker will skip it


def test_cancel_running_job_sets_the_flag(start_api):
    api = start_api()
    job_id = submit(api)
    api.store.try_start(job_id, "w")
    response = api.http.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"]
    assert api.store.is_cancel_requested(job_id)


def test_status_progress_result_and_timings(start_api):
    api = start_api()
    job_id = submit(api)
    api.store.try_start(job_id, "w")
    api.store.set_progress(job_id, canvas=2, step=5)
    running = api.http.get(f"/v1/jobs/{job_id}").json()
    assert running["status"] == "running" and running["progress"] == {"canvas": 2, "step": 5}
    assert running["attempts"] == 1 and running["timings"]["queue_seconds"] >= 0
    api.store.succeed(job_id, {"text": "done!", "finish_reason": "stop"})
    done = api.http.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "succeeded" and done["result"]["text"] == "done!"
    assert done["timings"]["run_seconds"] >= 0 and done["timings"]["finished_at"] >= done["timings"]["started_at"]


def test_sse_replays_all_events_and_resumes_after_last_event_id(start_api):
    api = start_api()
    job_id = submit(api, body={"stream_drafts": True})
    api.store.try_start(job_id, "w")
    api.store.append_event(job_id, "draft", {"canvas": 0, "step": 1, "text": "he"})
    api.store.append_event(job_id, "canvas", {"canvas": 0, "text": "hello"})
    api.store.succeed(job_id, {"text": "hello"})
    frames = parse_sse(api.http.get(f"/v1/jobs/{job_id}/events").text)
    assert [f["event"] for f in frames] == ["queued", "started", "draft", "canvas", "done"]
    assert frames[-1]["data"]["result"] == {"text": "hello"}
    resumed = api.http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": frames[2]["id"]})
    assert [f["event"] for f in parse_sse(resumed.text)] == ["canvas", "done"]
    by_query = api.http.get(f"/v1/jobs/{job_id}/events", params={"last_event_id": frames[3]["id"]})
    assert [f["event"] for f in parse_sse(by_query.text)] == ["done"]
    bad = api.http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "Last-Event-ID"


def test_sse_follows_live_events_with_keepalives_until_done(start_api):
    api = start_api(sse_keepalive_seconds=0.1)
    job_id = submit(api)

    idle_stream_kept_alive = threading.Event()

    def worker():
        # Events start only once the idle client has seen a keep-alive: a fixed sleep raced the client's connect
        # on a loaded machine (the job could finish before the first keep-alive was due).
        idle_stream_kept_alive.wait(timeout=10)
        api.store.try_start(job_id, "w")
        for step in range(1, 4):
            api.store.append_event(job_id, "draft", {"step": step})
            time.sleep(0.05)
        api.store.fail(job_id, "engine_error", "boom")

    thread = threading.Thread(target=worker)
    thread.start()
    chunks = []
    with httpx.stream("GET", f"{api.url}/v1/jobs/{job_id}/events", timeout=10.0) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_text():
            chunks.append(chunk)
            if ": keep-alive" in "".join(chunks):
                idle_stream_kept_alive.set()
    thread.join(timeout=10)
    text = "".join(chunks)
    assert ": keep-alive" in text
    frames = parse_sse(text)
    assert [f["event"] for f in frames] == ["queued", "started", "draft", "draft", "draft", "failed"]
    assert frames[-1]["data"]["error"] == {"code": "engine_error", "message": "boom"}


def test_overdue_jobs_read_as_expired(start_api):
    api = start_api(job_lease_seconds=1)
    queued, running = submit(api), submit(api, body={"prompt": "other"})
    api.store.try_start(running, "w")
    for job_id in (queued, running):
        api.redis.hset(f"job:{job_id}", "deadline_at", repr(time.time() - 1.5))
    expired = api.http.get(f"/v1/jobs/{queued}").json()
    assert expired["status"] == "expired" and expired["error"]["code"] == "deadline_exceeded"
    assert "not started" in expired["error"]["message"]
    assert api.http.get(f"/v1/jobs/{running}").json()["status"] == "running"  # its worker still has time
    api.redis.hset(f"job:{running}", "deadline_at", repr(time.time() - 3))
    assert api.http.get(f"/v1/jobs/{running}").json()["status"] == "expired"
    frames = parse_sse(api.http.get(f"/v1/jobs/{queued}/events").text)
    assert frames[-1]["event"] == "expired"


def test_readyz_ignores_workers_of_other_queues(start_api):
    api = start_api()
    api.store.heartbeat("other-model-worker", {"queue": "dgemma.some-other-model"})
    assert api.http.get("/readyz").status_code == 503


@pytest.mark.slow
def test_sse_survives_silence_longer_than_the_redis_client_default_timeout(start_api):
    """A keep-alive interval above redis-py's 5 s default socket timeout: the blocking read must not be cut."""
    api = start_api(sse_keepalive_seconds=6.0)
    job_id = submit(api)

    def worker():
        time.sleep(6.5)  # one full silent keep-alive interval, longer than 5 s
        api.store.try_start(job_id, "w")
        api.store.fail(job_id, "engine_error", "late")

    thread = threading.Thread(target=worker)
    thread.start()
    with httpx.stream("GET", f"{api.url}/v1/jobs/{job_id}/events", timeout=30.0) as response:
        text = "".join(response.iter_text())
    thread.join(timeout=30)
    assert [f["event"] for f in parse_sse(text)] == ["queued", "started", "failed"]
