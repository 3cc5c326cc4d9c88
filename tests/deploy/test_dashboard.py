"""The Grafana dashboard: every panel's PromQL parses (promtool checks it as a recording rule), uses the model
variable where the series carry a model label, and covers what an operator asks first."""

from __future__ import annotations

import json
import shutil
import subprocess

import yaml

from services.settings import REPO_ROOT

DASHBOARD = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / "dgserve.json").read_text())


def exprs() -> dict[str, list[str]]:
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in DASHBOARD["panels"]}


def test_every_panel_query_parses(tmp_path):
    rules = [{"record": f"dashboard:panel_{i}", "expr": expr.replace("$model", ".*")}
             for i, expr in enumerate(e for group in exprs().values() for e in group)]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: apt-get install -y prometheus (see .ci/run)"
    checked = subprocess.run([binary, "check", "rules", "panels.yml"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_answers_the_operators_questions():
    text = json.dumps(exprs())
    for needed in ("dgserve_live_workers", 'up{job=~', "dgserve_worker_jobs_total", "dgserve_job_queue_wait_seconds",
                   "le, kind", "dgserve_torch_memory_allocated_bytes", "dgserve_gpu_memory_total_bytes",
                   "redis_memory_used_bytes"):
        assert needed in text, needed
    variables = {var["name"] for var in DASHBOARD["templating"]["list"]}
    assert "model" in variables


def test_queue_depth_hides_the_unknown_marker_and_requests_leave_out_probes():
    queue = next(e for title, group in exprs().items() if title.startswith("Queue depth") for e in group)
    assert ">= 0" in queue  # -1 (Redis unreachable) is a gap, not a value
    traffic = next(group for title, group in exprs().items() if title.startswith("API requests/s by route"))
    assert all('route!~"/healthz|/readyz.*|/metrics"' in expr and "by (route" in expr for expr in traffic)


def test_model_labelled_series_follow_the_model_variable():
    for title, group in exprs().items():
        for expr in group:
            if "dgserve_" in expr and "dgserve_api_requests_total" not in expr:
                assert 'model=~"$model"' in expr, (title, expr)
