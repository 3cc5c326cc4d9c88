"""Process helpers for integration tests: free ports, bounded waits, subprocesses that always get stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from services.launcher import free_loopback_port

free_port = free_loopback_port  # a loopback TCP port that was free a moment ago (the launcher's own helper)


def api_command(port: int, *extra: str) -> list[str]:
    """The argv of one real API process (uvicorn, the app built from DGSERVE_* env) on 127.0.0.1:`port`."""
    return [sys.executable, "-m", "uvicorn", "--factory", "services.api.app:create_app_from_env",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra]


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05,
               what: str = "condition") -> None:
    """Poll `condition` until it is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout:.1f}s")


def http_ok(url: str) -> bool:
    """True if GET `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_for_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers 2xx; fail early if `process` exits first."""
    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode} before {url} was up")
        return http_ok(url)

    wait_until(ready, timeout, interval=0.1, what=f"HTTP 2xx from {url}")


def start_process(args: Sequence[str], log_path: Path | None = None, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> subprocess.Popen:
    """Start `args` in its own process group, output to `log_path` (or discarded)."""
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM the process group, wait up to `timeout`, then SIGKILL it. Returns the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
    return process.returncode


@contextlib.contextmanager
def running_process(args: Sequence[str], **kwargs) -> Iterator[subprocess.Popen]:
    """`start_process` as a context manager that always stops the process."""
    process = start_process(args, **kwargs)
    try:
        yield process
    finally:
        stop_process(process)
