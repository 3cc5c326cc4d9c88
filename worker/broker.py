"""The worker's kombu transport: kombu's Redis transport, made to ride out a broker outage.

Why it exists. When the consumer's Redis connection drops (a Redis restart, a network blip), Celery's
consumer closes the broken connection (`Consumer.on_connection_error_after_connected`: `connection.collect()`
then `connection.close()`) and reconnects, while the task threads keep running their jobs
(`worker_cancel_long_running_tasks_on_connection_loss` is False). Closing a channel makes kombu hand its
unacknowledged messages back to the queue (`virtual.QoS.restore_unacked_once`, logged as "Restoring N
unacknowledged message(s)"). During the outage that restore cannot work, and how it fails depends on the
order in which kombu tears the connection down:

- Redis refuses the connection: `redis.ConnectionError` propagates out of `Channel.close`, which then skips
  the rest of its own cleanup (the poller, `Transport.close_channel`), so channels stay registered with a
  transport that is being closed.
- `Connection._do_close_transport` has already set the transport's `client` to None and the channel's pool
  was reset by `Channel._disconnect_pools`: rebuilding the pool for the restore reads
  `transport.client.hostname` and raises `AttributeError("'NoneType' object has no attribute 'hostname'")`.
  That is not one of the consumer's recoverable connection errors, so Celery's worker logs
  "Unrecoverable error" and exits with code 1, taking the engine and every job in flight with it.

What we do instead: the restore is attempted once, as kombu does; if it fails, the messages stay where they
are, in Redis's unacked set (the sorted set and hash kombu's Redis transport keeps), and one warning says so.
Nothing is lost by that. The jobs of those messages are either still running in this worker (the normal
case: the task threads finish them and commit through the job store), or, had this worker died, they are
recovered by the job store's leases (a live worker's orphan reaper requeues and re-sends them within a
lease). kombu's own visibility-timeout sweep (`unacked_restore_interval`) still restores the leftover
entries much later (`broker_visibility_timeout_seconds`, above the job deadline), and such a late copy finds
its job finished (acked) or running under a live lease (retried), never running it twice.
When the restore does succeed (Redis came back before the channel closed), the restored copies of jobs that
are still running here meet `WorkerRuntime.run_job`'s in-flight check and are retried, not run again.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

logger = logging.getLogger(__name__)


class OutageTolerantQoS(kombu_redis.QoS):
    """kombu's Redis QoS whose hand-back of unacked messages on channel close never raises, and whose acks of
    messages delivered on a channel that was closed meanwhile do not raise either."""

    def ack(self, delivery_tag: Any) -> None:
        if not self.channel.closed:
            super().ack(delivery_tag)
            return
        # The task ran across a reconnect: its delivery tag belongs to the closed channel, which has no
        # connection left to ack through. Its unacked entry stays until kombu's visibility-timeout sweep
        # restores it; the restored copy then finds the job finished and is acked (see the module doc).
        logger.info("message %s was delivered before the broker connection was re-established; its ack is "
                    "left to the visibility-timeout sweep", delivery_tag)
        kombu_virtual.QoS.ack(self, delivery_tag)

    def restore_unacked_once(self, stderr: Any = None) -> None:
        pending = len(self._delivered or ())
        try:
            super().restore_unacked_once(stderr)
        except Exception as err:  # noqa: BLE001 - any failure here would end the worker (see the module doc)
            logger.warning("broker unreachable: %d unacked message(s) stay in Redis's unacked set (%s: %s); "
                           "their jobs keep running here or are recovered through their leases",
                           pending, type(err).__name__, err)


class OutageTolerantChannel(kombu_redis.Channel):
    QoS = OutageTolerantQoS


class OutageTolerantSentinelChannel(kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (it subclasses the Redis `Channel` and only changes how its connection pool finds
    the master) with the same QoS: a failover is an outage of the old master followed by a reconnect to the new."""

    QoS = OutageTolerantQoS


class OutageTolerantRedisTransport(kombu_redis.Transport):
    """Celery's `broker_transport` for dgserve workers (`redis://` URLs, kombu's Redis transport otherwise)."""

    Channel = OutageTolerantChannel


class OutageTolerantSentinelTransport(kombu_redis.SentinelTransport):
    """Celery's `broker_transport` for dgserve workers behind Redis Sentinel (`sentinel://` URLs)."""

    Channel = OutageTolerantSentinelChannel


TRANSPORT_PATH = f"{__name__}:{OutageTolerantRedisTransport.__name__}"
SENTINEL_TRANSPORT_PATH = f"{__name__}:{OutageTolerantSentinelTransport.__name__}"
