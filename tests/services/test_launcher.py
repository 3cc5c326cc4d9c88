"""`dgserve up`: the whole stack from one command on a bare cache folder, then a clean stop on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from services import launcher
from services.client import DgserveClient
from services.settings import BUNDLED_MODEL_DIR, REPO_ROOT
from tests.support.processes import free_port, stop_process, wait_until


def test_existing_default_model_is_not_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    target = launcher.random_model_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    said: list[str] = []
    assert launcher.ensure_default_model(str(target), say=said.append) == str(target)
    assert said == []  # nothing written, nothing announced
    assert launcher.ensure_default_model("org/some-model", say=said.append) == "org/some-model" and said == []


def test_find_redis_server_returns_an_executable():
    assert os.access(launcher.find_redis_server(), os.X_OK)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
@pytest.mark.slow
def test_up_serves_a_job_and_stops_everything_on_ctrl_c(tmp_path):
    port = free_port()
    log = tmp_path / "up.log"
    env = {**os.environ, "DGSERVE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "DGSERVE_WORKER_CONCURRENCY": "4", "PYTHONUNBUFFERED": "1"}
    env.pop("DGSERVE_MODEL", None)
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--cpu", "--port", str(port)],
                              cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "ready:" in log.read_text() or up.poll() is not None, 300, interval=0.5,
                   what="dgserve up to report ready")
        text = log.read_text()
        assert up.poll() is None, text
        # The embedded default: the bundled trained model when the repo ships it, else the loud random one.
        if (BUNDLED_MODEL_DIR / "config.json").is_file():
            assert f"model {BUNDLED_MODEL_DIR}" in text and "RANDOM-WEIGHT" not in text, text
        else:
            assert "RANDOM-WEIGHT" in text, text
        assert f"http://127.0.0.1:{port}" in text
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)", text).group(1))
        with DgserveClient(f"http://127.0.0.1:{port}") as client:
            accepted = client.generate("Hello", max_new_tokens=8, seed=1)
            job = client.wait(accepted.id, timeout=120)
        assert job.status == "succeeded" and isinstance(job.result["text"], str), job
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert up.wait(timeout=90) == 0
        text = log.read_text()
        pids = [int(pid) for pid in re.findall(r"stopping \w+ \(pid (\d+)\)", text)]
        assert len(pids) == 3, text
        time.sleep(0.2)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not _port_open(port) and not _port_open(redis_port)
    finally:
        stop_process(up, timeout=30)


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    said: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert launcher.run_up(port=busy.getsockname()[1], say=said.append) == 1
    assert "already in use" in said[-1] and not (tmp_path / "models").exists()
