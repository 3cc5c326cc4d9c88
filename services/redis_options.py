"""How every Redis client of the service connects: timeouts and retries (sync and asyncio alike)."""

from __future__ import annotations

from typing import Any

from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.settings import Settings


def redis_client_options(settings: Settings, for_asyncio: bool = False) -> dict[str, Any]:
    """Timeouts and retries of every Redis client of the service (`for_asyncio`: for `redis.asyncio`).

    A command waits at most `redis_socket_timeout_seconds` for an answer, so a Redis that stalls without
    closing the connection cannot hang a request; one quick retry covers a pooled connection that a Redis
    restart closed. (redis-py's default retries ten times with backoff: about a minute of silence.)
    """
    timeout = settings.redis_socket_timeout_seconds
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "retry": (AsyncRetry if for_asyncio else Retry)(ExponentialBackoff(cap=0.2, base=0.05), retries=1)}
