"""Prometheus rules and config checked by promtool (Debian's `prometheus` package; .ci/run installs it, so
these never skip in CI): syntax, and a unit test for every alert, including the no-worker case."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from services.settings import REPO_ROOT

PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: apt-get install -y prometheus (see .ci/run)"
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def test_rules_and_compose_config_are_valid():
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        checked = promtool(*args)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_has_a_passing_unit_test():
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    firing = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    assert alerts == firing, f"alerts without a firing test: {alerts - firing}"
    assert {"DgserveNoLiveWorkers", "DgserveScrapeTargetDown", "DgserveQueueWaitP99High",
            "DgserveRedisMemoryHigh"} <= alerts


def test_no_worker_case_fails_with_a_broken_rule(tmp_path):
    """The unit tests can fail: the old no-throughput rule (which needs the worker's own series) misses a stopped
    worker, and promtool says so."""
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "DgserveNoThroughput":
            rule["expr"] = "sum(rate(dgserve_generated_tokens_total[5m])) == 0 and sum(dgserve_requests_waiting) > 0"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path / "alerts_test.yml")
    binary = shutil.which("promtool")
    assert binary
    tested = subprocess.run([binary, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert tested.returncode != 0 and "DgserveNoThroughput" in tested.stdout + tested.stderr
