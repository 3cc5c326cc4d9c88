"""`dgserve up`: ports, per-stack data, supervision of its children, and clean or forced stops."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from services import launcher
from services import supervisor as supervisor_module
from services.client import DgserveClient
from services.jobs import JobStore
from services.settings import BUNDLED_MODEL_DIR, REPO_ROOT, Settings
from services.supervisor import StopSignals, Supervisor
from tests.support.processes import free_port, stop_process, wait_until
from tests.support.redis_server import run_redis_server


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


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a TCP socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _child_pids(parent: int) -> dict[int, str]:
    """pid -> command line of the direct children of `parent`."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return children


def _wait_job(client: DgserveClient, prompt: str) -> None:
    job = client.wait(client.generate(prompt, max_new_tokens=8, seed=1).id, timeout=120)
    assert job.status == "succeeded" and isinstance(job.result["text"], str), job


@pytest.mark.integration
@pytest.mark.slow
def test_up_serves_supervises_and_drains_on_sighup(tmp_path):
    """One `dgserve up`: a job runs; everything listens on loopback; a worker killed with -9 is restarted and
    serves again; SIGHUP (a closed terminal) drains within the launcher's stop timeout, leaving no job
    `running` in the stack's own Redis data."""
    port = free_port()
    log = tmp_path / "up.log"
    cache = tmp_path / "cache"
    env = {**os.environ, "DGSERVE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "DGSERVE_WORKER_CONCURRENCY": "2", "PYTHONUNBUFFERED": "1"}
    for name in ("DGSERVE_MODEL", "DGSERVE_API_PORT", "DGSERVE_WORKER_METRICS_PORT"):
        env.pop(name, None)
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--cpu", "--port", str(port),
                               "--stop-timeout", "30"], cwd=REPO_ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "ready:" in log.read_text() or up.poll() is not None, 300, interval=0.5,
                   what="dgserve up to report ready")
        text = log.read_text()
        assert up.poll() is None, text
        # The embedded default: the bundled trained model when the repo ships it, else the loud random one.
        if (BUNDLED_MODEL_DIR / "config.json").is_file():
            assert "models/dgtiny: the small embedded model, trained on this machine" in text, text
            assert "RANDOM-WEIGHT" not in text
        else:
            assert "RANDOM-WEIGHT" in text, text
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)", text).group(1))
        metrics_port = int(re.search(r"metrics http://127\.0\.0\.1:(\d+)/metrics", text).group(1))
        assert "warning" not in text, text
        assert f"page     http://127.0.0.1:{port}/" in text, text  # the playground is named first
        assert "<title>dgserve playground" in httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text
        for listening in (port, redis_port, metrics_port):
            assert _listening_addresses(listening) == {"127.0.0.1"}, listening
        with DgserveClient(f"http://127.0.0.1:{port}") as client:
            _wait_job(client, "Hello")
            workers = [pid for pid, cmd in _child_pids(up.pid).items() if "celery" in cmd and "worker" in cmd]
            assert len(workers) == 1, _child_pids(up.pid)
            os.kill(workers[0], signal.SIGKILL)
            wait_until(lambda: "restarting it" in log.read_text(), 30, interval=0.2, what="the worker's restart")
            assert up.poll() is None
            _wait_job(client, "Again")  # the restarted worker serves
            long_jobs = [client.generate("def f(x):", max_new_tokens=2048, seed=n).id
                         for n in range(4)]
            wait_until(lambda: any(client.get(job).status == "running" for job in long_jobs), 60,
                       what="a long job to run")
        os.killpg(up.pid, signal.SIGHUP)  # what closing the terminal sends
        started = time.monotonic()
        assert up.wait(timeout=90) == 0
        text = log.read_text()
        assert time.monotonic() - started < 3 * 30, text
        assert "killing" not in text, text  # every child stopped within the timeout: nothing was killed
        pids = [int(pid) for pid in re.findall(r"stopping \w+ \(pid (\d+)\)", text)]
        assert len(pids) == 3, text
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not _port_open(port) and not _port_open(redis_port)
        data = cache / "stacks" / f"port-{port}" / "redis"
        with run_redis_server(data, durable=True) as server:
            store = JobStore(server.client(), Settings(redis_url=server.url))
            statuses = {job: store.get(job).status for job in long_jobs}
        assert "running" not in statuses.values(), statuses  # drained or handed back, none left running
    finally:
        stop_process(up, timeout=30)


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    said: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert launcher.run_up(launcher.UpOptions(port=busy.getsockname()[1]), say=said.append) == 1
    assert "already in use" in said[-1] and not (tmp_path / "models").exists()


def test_up_honours_DGSERVE_API_PORT(tmp_path, monkeypatch):
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    said: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("DGSERVE_API_PORT", str(port))
        assert launcher.run_up(launcher.UpOptions(), say=said.append) == 1  # no --port: the variable's port
    assert f"API port 127.0.0.1:{port} is already in use" in said[-1], said


def test_a_busy_worker_metrics_port_is_reported_not_silent(tmp_path, monkeypatch):
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    said: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("DGSERVE_WORKER_METRICS_PORT", str(busy.getsockname()[1]))
        assert launcher.run_up(launcher.UpOptions(port=free_port()), say=said.append) == 1
    assert "worker metrics port" in said[-1] and "already in use" in said[-1], said
    monkeypatch.delenv("DGSERVE_WORKER_METRICS_PORT")
    # Unset, each stack gets a free port of its own (never the shared default 9400 for two stacks).
    first, second = launcher.worker_metrics_port(None), launcher.worker_metrics_port(None)
    assert first > 0 and second > 0


def test_each_stack_has_its_own_locked_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    with launcher.stack_dir_locked(8000) as first, launcher.stack_dir_locked(8001) as second:
        assert first != second and not first.is_relative_to(second) and not second.is_relative_to(first)
        with pytest.raises(OSError, match="another dgserve up"), launcher.stack_dir_locked(8000):
            pass
    with launcher.stack_dir_locked(8000) as again:  # released when its stack stopped
        assert again == first


def test_up_refuses_a_public_address_without_api_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("DGSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DGSERVE_API_KEYS", raising=False)
    said: list[str] = []
    assert launcher.run_up(launcher.UpOptions(host="0.0.0.0", port=free_port()), say=said.append) == 1
    assert "without API keys" in said[-1] and "DGSERVE_API_KEYS" in said[-1]


def test_worker_drains_within_the_launchers_stop_timeout():
    assert launcher.shutdown_grace_seconds(30.0) < 30.0
    assert launcher.shutdown_grace_seconds(12.0) <= 6.0


def test_model_line_says_the_embedded_model_is_small_and_how_to_serve_another():
    line = launcher.model_line(str(BUNDLED_MODEL_DIR))
    assert "\n" not in line and "small" in line and "trained on this machine" in line
    assert "DGSERVE_MODEL=" in line


def test_make_up_takes_a_port():
    # Under `make test` the outer make exports MAKEFLAGS/MAKELEVEL, which turn on "Entering/Leaving directory"
    # lines in a nested make; the child gets a clean make environment so the dry run prints only the recipe.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    dry_run = subprocess.run(["make", "--no-print-directory", "-n", "up", "PORT=8123"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=60, env=env)
    assert dry_run.returncode == 0, dry_run.stderr
    recipe = [line for line in dry_run.stdout.splitlines() if "dgserve up" in line]
    assert recipe and recipe[-1].strip().endswith("dgserve up --port 8123"), dry_run.stdout


def _signals_supervisor(tmp_path) -> tuple[Supervisor, list[str]]:
    said: list[str] = []
    return Supervisor(tmp_path, StopSignals(), said.append), said


def test_supervisor_restarts_a_child_that_exits_and_gives_up_after_its_budget(tmp_path):
    supervisor, said = _signals_supervisor(tmp_path)
    sleeper = supervisor.start("worker", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    try:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait(timeout=10)
        assert supervisor.restart_exited() is None
        restarted = supervisor.children[0].process
        assert restarted.pid != sleeper.pid and restarted.poll() is None
        assert "worker (pid" in said[-1] and "restarting it" in said[-1]
        for _ in range(supervisor_module.RESTARTS_PER_WINDOW - 1):
            os.kill(supervisor.children[0].process.pid, signal.SIGKILL)
            supervisor.children[0].process.wait(timeout=10)
            assert supervisor.restart_exited() is None
        os.kill(supervisor.children[0].process.pid, signal.SIGKILL)
        supervisor.children[0].process.wait(timeout=10)
        assert supervisor.restart_exited() is supervisor.children[0]  # one exit too many: give up
    finally:
        supervisor.signals.handle(signal.SIGTERM)
        supervisor.stop(timeout_s=5)


def test_a_second_signal_forces_the_stop(tmp_path):
    supervisor, said = _signals_supervisor(tmp_path)
    stubborn = supervisor.start("worker", [sys.executable, "-c", "import signal, time; "
                                           "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
                                dict(os.environ))
    time.sleep(0.5)  # let it install its handler
    supervisor.signals.handle(signal.SIGINT)  # first Ctrl-C: a clean stop, which this child ignores
    threading.Timer(1.0, supervisor.signals.handle, args=(signal.SIGINT,)).start()  # second Ctrl-C
    started = time.monotonic()
    supervisor.stop(timeout_s=60)
    assert time.monotonic() - started < 10 and stubborn.poll() is not None
    assert any("forced by a second signal" in line for line in said), said
