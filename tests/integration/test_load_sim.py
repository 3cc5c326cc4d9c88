"""bench/load_sim.py end to end at a tiny rate: real redis-server, a real API process and a real Celery worker on
the simulated engine; every accepted job ends done exactly once and the report's measurements are filled in
(a run, not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_load_sim_runs_a_tiny_rate_and_loses_or_duplicates_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "load_sim.py"), "--rates", "4,8", "--seconds", "2",
         "--workers", "1", "--concurrency", "8", "--steps", "4", "--json", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=540, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert [phase["offered_per_s"] for phase in report["phases"]] == [4.0, 8.0]
    for phase, sent in zip(report["phases"], (8, 16), strict=True):
        assert phase["sent"] == phase["accepted"] == sent and phase["errors"] == {} and phase["unsent"] == 0
        assert phase["drained"] and phase["statuses"] == {"succeeded": sent}
        assert phase["lost"] == 0 and phase["duplicated"] == 0
        # One job's control-plane work: a create script, a Celery message, a start, a commit at least.
        assert phase["redis_commands_per_job"] >= 10 and phase["redis_round_trips_per_job"] >= 4
        assert phase["top_commands_per_job"]["evalsha"] >= 3
        assert phase["cpu_ms_per_job"]["api"] > 0 and phase["cpu_ms_per_job"]["workers"] > 0
        assert 0 < phase["submit_ms"]["p50"] <= phase["submit_ms"]["p99"]
        assert 0 <= phase["queue_wait_ms"]["p50"] <= phase["queue_wait_ms"]["p99"]
    logs = "".join(path.read_text(errors="replace") for path in tmp_path.glob("worker-*.log"))
    assert "SIMULATED ENGINE" in logs  # the workers said what they run
