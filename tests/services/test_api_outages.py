"""Outages and bad input answer in the one JSON error shape, never 500 text/plain nor a hung request
(issue 11): a stopped or paused (SIGSTOP) real redis-server is 503 with Retry-After on every route that
reads the store; ids that are not job ids are 404 before Redis is asked; an out-of-range Last-Event-ID is 422."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from services.api.app import create_app
from services.settings import Settings
from tests.services.api_keys import KEY_A, KEY_B
from tests.support.api_server import serve_in_thread
from tests.support.redis_server import run_redis_server

AS_A, AS_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}


def submit(http: httpx.Client, headers: dict | None = None) -> str:
    response = http.post("/v1/jobs", json={"prompt": "hi"}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def store_routes(job_id: str) -> list[tuple[str, str, dict | None]]:
    """Every route that needs the job store: (method, path, JSON body)."""
    return [("POST", "/v1/jobs", {"prompt": "hi"}), ("GET", f"/v1/jobs/{job_id}", None),
            ("GET", f"/v1/jobs/{job_id}/events", None), ("DELETE", f"/v1/jobs/{job_id}", None),
            ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4}),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]


def test_what_is_not_a_job_id_is_404_like_an_unknown_or_another_keys_job(start_api):
    api = start_api(api_keys=f"{KEY_A},{KEY_B}")
    job_id = submit(api.http, AS_A)
    answers = set()
    for other in (f"{job_id}:events", "dgserve:workers", "0" * 32, job_id.upper(), job_id):
        for method, path in (("GET", f"/v1/jobs/{other}"), ("DELETE", f"/v1/jobs/{other}"),
                             ("GET", f"/v1/jobs/{other}/events")):
            response = api.http.request(method, path, headers=AS_B)
            assert response.status_code == 404, (method, path, response.text)
            answers.add(response.text)
    assert len(answers) == 1  # B cannot tell A's real job from an unknown id or another key
    assert api.http.get(f"/v1/jobs/{job_id}", headers=AS_A).status_code == 200


@pytest.mark.parametrize("resume", ["99999999999999999999-0", "1-18446744073709551616", "12", "abc-1", "1-2-3"])
def test_last_event_id_redis_would_not_take_is_422(start_api, resume):
    api = start_api()
    job_id = submit(api.http)
    for kwargs in ({"headers": {"Last-Event-ID": resume}}, {"params": {"last_event_id": resume}}):
        response = api.http.get(f"/v1/jobs/{job_id}/events", **kwargs)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "Last-Event-ID"
    with api.http.stream("GET", f"/v1/jobs/{job_id}/events",
                         headers={"Last-Event-ID": "9999999999999999999-9999999999999999999"}) as largest:
        assert largest.status_code == 200  # 19 digits each: still a valid resume point


def assert_unavailable(http: httpx.Client, job_id: str, within_s: float) -> None:
    for method, path, body in store_routes(job_id):
        started = time.monotonic()
        response = http.request(method, path, json=body)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, (method, path, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "store_unavailable"
        assert int(response.headers["retry-after"]) > 0
        assert elapsed < within_s, (method, path, elapsed)


@pytest.mark.slow
def test_a_paused_or_stopped_redis_is_503_with_retry_after_and_no_hang(tmp_path: Path, tokenizer_model_dir: Path):
    with run_redis_server(tmp_path / "redis") as server:
        settings = Settings(redis_url=server.url, model=str(tokenizer_model_dir), redis_socket_timeout_seconds=1.0,
                            retry_after_seconds=2)
        with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as http:
            job_id = submit(http)
            os.kill(server.process.pid, signal.SIGSTOP)  # stalls without closing any connection
            try:
                # A timeout plus one retry, doubled for a loaded machine; redis-py's default retries ~a minute.
                assert_unavailable(http, job_id, within_s=10.0)
                assert http.get("/readyz").status_code == 503
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert http.get(f"/v1/jobs/{job_id}").status_code == 200  # back without a restart of the API
            server.process.kill()
            server.process.wait(timeout=10)
            assert_unavailable(http, job_id, within_s=10.0)


def test_a_body_that_is_not_utf8_is_422_not_400(start_api):
    api = start_api()
    for path in ("/v1/jobs", "/v1/completions", "/v1/chat/completions"):
        response = api.http.post(path, content=b"W\xff\x19", headers={"content-type": "application/json"})
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["field"] == "body"
