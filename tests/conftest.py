"""Session-wide fixtures: one real redis-server per test session, and a fresh database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer, run_redis_server

# Database 0 is left for tests that share the server as is; fresh databases come from 1..63.
_DATABASES = itertools.cycle(range(1, 64))


@pytest.fixture(scope="session")
def redis_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's redis-server (`--save '' --appendonly no`) with its port, process and client()."""
    with run_redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(redis_instance: RedisServer) -> str:
    """URL (`redis://127.0.0.1:<port>/0`) of the session's real redis-server."""
    return redis_instance.url


@pytest.fixture
def fresh_redis_url(redis_instance: RedisServer) -> Iterator[str]:
    """URL of an emptied database of the session server, for tests that must not see others' keys."""
    db = next(_DATABASES)
    client = redis_instance.client(db)
    client.flushdb()
    client.close()
    yield f"redis://127.0.0.1:{redis_instance.port}/{db}"
