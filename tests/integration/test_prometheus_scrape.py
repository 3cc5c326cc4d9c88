"""A real Prometheus (the distribution's `prometheus` binary) scrapes the shared stack's API and worker while
jobs run: both targets are up, the counters move, every dashboard panel's query evaluates, and no alert fires
on a healthy stack."""

from __future__ import annotations

import json
import shutil
import time
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from services.settings import REPO_ROOT
from tests.integration.conftest import Stack, submit, wait_for_status
from tests.support.processes import free_port, start_process, stop_process, wait_for_http, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "dgserve.json"


def _prometheus_config(stack: Stack) -> dict:
    api, worker = urlparse(stack.api_url).netloc, urlparse(stack.worker.metrics_url).netloc
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(REPO_ROOT / "deploy" / "prometheus" / "alerts.yml")],
            "scrape_configs": [{"job_name": "dgserve-api", "static_configs": [{"targets": [api]}]},
                               {"job_name": "dgserve-worker", "static_configs": [{"targets": [worker]}]}]}


def _query(base: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def test_prometheus_scrapes_the_stack_and_every_panel_evaluates(stack: Stack, tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: apt-get install -y prometheus (see .ci/run)"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(_prometheus_config(stack)))
    port = free_port()
    process = start_process([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            log_path=tmp_path / "prometheus.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/-/ready", timeout=60, process=process)
        with stack.client() as client:
            jobs = [submit(client, {"prompt": f"scrape {n}", "max_new_tokens": 8, "seed": n}) for n in range(4)]
            for job in jobs:
                wait_for_status(client, job, {"succeeded"})
        time.sleep(2.5)  # two more scrapes after the last job

        def targets_up() -> bool:
            return {r["metric"]["job"]: r["value"][1] for r in _query(base, "up")} == \
                {"dgserve-api": "1", "dgserve-worker": "1"}

        wait_until(targets_up, 30, interval=0.5, what="both scrape targets up")
        assert float(_query(base, "sum(dgserve_generated_tokens_total)")[0]["value"][1]) > 0
        assert float(_query(base, "max(dgserve_live_workers)")[0]["value"][1]) >= 1
        outcomes = _query(base, 'sum by (outcome) (dgserve_worker_jobs_total)')
        assert any(r["metric"]["outcome"] == "succeeded" for r in outcomes), outcomes
        dashboard = json.loads(DASHBOARD.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                _query(base, target["expr"].replace("$model", ".*"))  # evaluates without error
        alerts = httpx.get(f"{base}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        assert [a for a in alerts if a["state"] == "firing"] == []
        rules = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        assert all(rule["health"] == "ok" for rule in rules), rules
    finally:
        stop_process(process)
