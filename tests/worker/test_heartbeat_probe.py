"""`python -m worker.heartbeat_probe`, the worker's liveness probe: healthy on a fresh file, not on a stale or
missing one (a real process, as the kubelet runs it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from services.settings import REPO_ROOT


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.heartbeat_probe", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_probe_follows_the_heartbeat_file(tmp_path):
    beat = tmp_path / "worker.heartbeat"
    missing = probe("--file", str(beat))
    assert missing.returncode == 1 and "no heartbeat file" in missing.stderr
    beat.touch()
    assert probe("--file", str(beat), "--max-age", "60").returncode == 0
    old = time.time() - 300
    os.utime(beat, (old, old))
    stale = probe("--file", str(beat), "--max-age", "120")
    assert stale.returncode == 1 and "engine loop hung" in stale.stderr


def test_probe_reads_the_worker_settings_path(tmp_path):
    beat = tmp_path / "from-env.heartbeat"
    beat.touch()
    env = {**os.environ, "DGSERVE_WORKER_HEARTBEAT_FILE": str(beat)}
    ran = subprocess.run([sys.executable, "-m", "worker.heartbeat_probe"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr


def test_a_running_worker_loop_keeps_its_liveness_file_fresh(tmp_path, fresh_redis_url):
    """The probe's file is the one the engine loop touches: a running runtime makes it, and it stays fresh."""
    from tests.worker.fake_engine import DeterministicFakeEngine
    from tests.worker.test_runtime_in_process import make_runtime

    beat = tmp_path / "loop.heartbeat"
    runtime = make_runtime(fresh_redis_url, DeterministicFakeEngine(canvas_length=8, steps_per_canvas=2),
                           worker_heartbeat_file=beat)
    try:
        deadline = time.monotonic() + 10
        while not beat.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe("--file", str(beat), "--max-age", "5").returncode == 0
        first = beat.stat().st_mtime
        time.sleep(1.3)  # touches are throttled to one a second
        assert beat.stat().st_mtime > first
    finally:
        runtime.stop()
    old = time.time() - 300
    os.utime(beat, (old, old))  # a stopped loop no longer touches it: the probe fails
    assert probe("--file", str(beat), "--max-age", "120").returncode == 1
