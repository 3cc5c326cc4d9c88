"""Operational endpoints over real HTTP (the no-torch rule of services/ is tests/test_import_boundaries.py)."""

from __future__ import annotations

API_METRIC_NAMES = [
    "dgserve_api_requests_total", "dgserve_api_request_duration_seconds_bucket",
    "dgserve_api_jobs_submitted_total", "dgserve_api_jobs_rejected_total", "dgserve_queue_depth",
    "dgserve_live_workers",
]


def test_healthz_and_openapi(start_api):
    api = start_api()
    assert api.http.get("/healthz").json() == {"status": "ok"}
    paths = api.http.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/readyz", "/metrics"} <= set(paths)
    assert api.http.get("/docs").status_code == 200


def test_readyz_needs_a_fresh_worker_heartbeat(start_api):
    api = start_api()
    not_ready = api.http.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["redis"] and not_ready.json()["workers"] == 0
    api.store.heartbeat("worker-cpu-1", {"device": "cpu", "queue": api.settings.queue_name})
    ready = api.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["workers"] == 1


def test_metrics_expose_documented_names_with_route_templates(start_api):
    api = start_api(max_queued_jobs=1)
    job_id = api.http.post("/v1/jobs", json={"prompt": "a"}).json()["id"]
    api.http.post("/v1/jobs", json={"prompt": "b"})  # 429
    api.http.post("/v1/jobs", json={"prompt": "c", "bogus": 1})  # 422
    api.http.get(f"/v1/jobs/{job_id}")
    text = api.http.get("/metrics").text
    for name in API_METRIC_NAMES:
        assert f"\n{name}{{" in text, name
    assert 'dgserve_api_jobs_submitted_total{kind="generate",model="tiny-api"} 1.0' in text
    assert 'dgserve_api_jobs_rejected_total{model="tiny-api",reason="queue_full"} 1.0' in text
    assert 'dgserve_api_jobs_rejected_total{model="tiny-api",reason="invalid"} 1.0' in text
    assert 'dgserve_queue_depth{model="tiny-api",queue="dgemma.tiny-api"} 1.0' in text
    assert 'route="/v1/jobs/{job_id}"' in text and job_id not in text  # never a job id in a label
    assert 'dgserve_api_requests_total{method="POST",route="/v1/jobs",status="429"} 1.0' in text
