"""The one place that builds the service's Redis clients: the job store's (sync), the API's event reader
(asyncio) and the Celery broker connection of the API and of the workers.

Two topologies, chosen by `Settings.redis_sentinels`:
- one Redis at `redis_url`;
- Redis Sentinel: the sentinels are asked for the current master of `redis_master_name` on every new
  connection, so after a failover each client follows the promoted replica (redis-py's `master_for` pools; the
  broker uses kombu's `sentinel://` transport with `master_name`). `redis_url` then gives only the database
  number and the credentials; `redis_password` overrides its password in both topologies.

Every client gets the same timeouts and retries (`redis_client_options`), so a Redis that stalls, restarts or
fails over turns into quick errors (503s in the API, retried writes in the worker) rather than hangs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio import sentinel as async_sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from services.settings import Settings

# What a demoted master answers to a write. Redis 6 wraps it inside the error of a Lua script ("Error running
# script ...: -READONLY You can't write against a read only replica."), which redis-py then does not recognise.
_DEMOTED_MASTER = "READONLY You can't write against a read only replica"


class FailoverAwareConnection(SentinelManagedConnection):
    """redis-py's Sentinel connection, which treats a READONLY answer from its master as a failover (drop the
    connection, raise ConnectionError, ask the sentinels again on the next connect) - but only the bare READONLY
    error; this one also recognises it inside a script error, which is how every job-store write (a Lua script)
    meets a master that Sentinel demoted while our pooled connection stayed open to it."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as err:
            if self.connection_pool.is_master and _DEMOTED_MASTER in str(err):
                self.disconnect()
                raise redis.ConnectionError(f"the master was demoted to a replica (failover): {err}") from err
            raise


class AsyncFailoverAwareConnection(async_sentinel.SentinelManagedConnection):
    """The `redis.asyncio` twin of `FailoverAwareConnection`."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except redis.ResponseError as err:
            if self.connection_pool.is_master and _DEMOTED_MASTER in str(err):
                await self.disconnect()
                raise redis.ConnectionError(f"the master was demoted to a replica (failover): {err}") from err
            raise


def redis_client_options(settings: Settings, for_asyncio: bool = False) -> dict[str, Any]:
    """Timeouts and retries of every Redis client of the service (`for_asyncio`: for `redis.asyncio`).

    A command waits at most `redis_socket_timeout_seconds` for an answer, so a Redis that stalls without
    closing the connection cannot hang a request; one quick retry covers a pooled connection that a Redis
    restart closed. (redis-py's default retries ten times with backoff: about a minute of silence.)
    """
    timeout = settings.redis_socket_timeout_seconds
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "retry": (AsyncRetry if for_asyncio else Retry)(ExponentialBackoff(cap=0.2, base=0.05), retries=1)}


def uses_sentinel(settings: Settings) -> bool:
    return bool(settings.redis_sentinels)


def sync_redis_client(settings: Settings, **options: Any) -> redis.Redis:
    """A `redis.Redis` (`decode_responses=True`) on the current master; `options` override the defaults."""
    options = {"decode_responses": True, **redis_client_options(settings), **options}
    if uses_sentinel(settings):
        sentinel = Sentinel(settings.redis_sentinels, sentinel_kwargs=_sentinel_kwargs(settings),
                            **_master_credentials(settings))
        return sentinel.master_for(settings.redis_master_name, redis_class=redis.Redis,
                                   connection_class=FailoverAwareConnection, **options)
    pool = redis.ConnectionPool.from_url(settings.redis_url, **options)
    if settings.redis_password is not None:
        pool.connection_kwargs["password"] = settings.redis_password
    return redis.Redis.from_pool(pool)


def async_redis_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """The `redis.asyncio` twin of `sync_redis_client`."""
    options = {"decode_responses": True, **redis_client_options(settings, for_asyncio=True), **options}
    if uses_sentinel(settings):
        sentinel = async_sentinel.Sentinel(settings.redis_sentinels, sentinel_kwargs=_sentinel_kwargs(settings),
                                           **_master_credentials(settings))
        return sentinel.master_for(settings.redis_master_name, redis_class=aioredis.Redis,
                                   connection_class=AsyncFailoverAwareConnection, **options)
    pool = aioredis.ConnectionPool.from_url(settings.redis_url, **options)
    if settings.redis_password is not None:
        pool.connection_kwargs["password"] = settings.redis_password
    return aioredis.Redis.from_pool(pool)


def celery_broker_url(settings: Settings) -> str:
    """Celery's `broker_url`: `redis_url` (its password replaced by `redis_password` if set), or with sentinels
    one `sentinel://[user:password@]host:port/db` per sentinel joined by `;` (kombu's Sentinel form; the
    credentials are the master's, the database is `redis_url`'s)."""
    if not uses_sentinel(settings):
        if settings.redis_password is None:
            return settings.redis_url
        parts = urlsplit(settings.redis_url)
        user = quote(parts.username or "", safe="")
        netloc = f"{user}:{quote(settings.redis_password, safe='')}@{parts.hostname or ''}"
        netloc += f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=netloc))
    credentials = _master_credentials(settings)
    auth = ""
    if credentials.get("password") is not None:
        auth = f"{quote(credentials.get('username') or '', safe='')}:{quote(credentials['password'], safe='')}@"
    return ";".join(f"sentinel://{auth}{_netloc(host, port)}/{credentials['db']}"
                    for host, port in settings.redis_sentinels)


def sentinel_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu transport options that Sentinel needs (merge them into `broker_transport_options`); {} without."""
    if not uses_sentinel(settings):
        return {}
    return {"master_name": settings.redis_master_name, "sentinel_kwargs": _sentinel_kwargs(settings)}


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options of the clients that talk to the sentinels themselves."""
    timeout = settings.redis_socket_timeout_seconds
    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.redis_sentinel_password is not None:
        kwargs["password"] = settings.redis_sentinel_password
    return kwargs


def _master_credentials(settings: Settings) -> dict[str, Any]:
    """Database number, username and password of the master (and replicas) when found through Sentinel."""
    url = parse_url(settings.redis_url)
    password = settings.redis_password if settings.redis_password is not None else url.get("password")
    credentials: dict[str, Any] = {"db": int(url.get("db") or 0), "password": password}
    if url.get("username"):
        credentials["username"] = url["username"]
    return credentials


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
