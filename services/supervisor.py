"""The child processes of `dgserve up`: started in order, restarted when one exits unexpectedly, stopped in
reverse order on the first signal and killed at once on a second.

Each child runs in a session of its own, so a Ctrl-C or a closed terminal (SIGHUP) reaches only the launcher,
which then decides: the API stops first (no new jobs), then the worker drains or hands its jobs back (its
shutdown grace is set below the launcher's stop timeout), then Redis, which must outlive the worker's last
store write.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Say = Callable[[str], None]
RESTARTS_PER_WINDOW = 5  # more unexpected exits than this within RESTART_WINDOW_SECONDS: give up
RESTART_WINDOW_SECONDS = 600.0


@dataclass
class Child:
    """One supervised process and what is needed to start it again."""

    name: str
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen
    restarts: list[float] = field(default_factory=list)  # monotonic times of recent restarts


@dataclass
class StopSignals:
    """Signal bookkeeping: the first SIGINT/SIGTERM/SIGHUP asks for a clean stop, a second one forces."""

    stop: threading.Event = field(default_factory=threading.Event)
    force: threading.Event = field(default_factory=threading.Event)

    def handle(self, signum: int, _frame: object = None) -> None:
        if self.stop.is_set():
            self.force.set()
        self.stop.set()


@dataclass
class Supervisor:
    """Children of `dgserve up`, logging to `log_dir/<name>.log`."""

    log_dir: Path
    signals: StopSignals
    say: Say
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        child = Child(name, args, env, self._spawn(name, args, env))
        self.children.append(child)
        return child.process

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps the descriptor)
        # New session: terminal signals reach only the launcher, which then stops children in order.
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
        log.close()
        return process

    def exited(self) -> Child | None:
        """The first child that is no longer running, if any."""
        return next((child for child in self.children if child.process.poll() is not None), None)

    def restart_exited(self) -> Child | None:
        """Restart every child that exited; returns a child that exited too often to restart (then give up)."""
        now = time.monotonic()
        for child in self.children:
            if child.process.poll() is None or self.signals.stop.is_set():
                continue
            child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_SECONDS]
            if len(child.restarts) >= RESTARTS_PER_WINDOW:
                return child
            child.restarts.append(now)
            self.say(f"{child.name} (pid {child.process.pid}) exited with code {child.process.returncode}; "
                     f"restarting it (restart {len(child.restarts)} of at most {RESTARTS_PER_WINDOW} in "
                     f"{RESTART_WINDOW_SECONDS / 60:.0f} min; see {self.log_dir / (child.name + '.log')})")
            child.process = self._spawn(child.name, child.args, child.env)
        return None

    def stop(self, timeout_s: float) -> None:
        """Stop children in reverse start order: SIGTERM, then SIGKILL after `timeout_s` each, or at once
        (for every child still running) when a second signal arrives."""
        for child in reversed(self.children):
            process = child.process
            if process.poll() is not None:
                continue
            if self.signals.force.is_set():
                self._kill(child, "forced by a second signal")
                continue
            self.say(f"stopping {child.name} (pid {process.pid})")
            _signal_group(process, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while process.poll() is None and time.monotonic() < deadline and not self.signals.force.is_set():
                time.sleep(0.05)
            if process.poll() is None:
                why = ("forced by a second signal" if self.signals.force.is_set()
                       else f"it did not stop within {timeout_s:.0f} s")
                self._kill(child, why)

    def _kill(self, child: Child, why: str) -> None:
        self.say(f"killing {child.name} (pid {child.process.pid}): {why}")
        _signal_group(child.process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=10)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
