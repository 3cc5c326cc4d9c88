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
