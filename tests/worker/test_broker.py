"""The worker's kombu transport against a real Redis: closing a channel with unacked messages after the
transport was torn down (what Celery's consumer does when the broker connection drops) must not raise, and
the messages stay in Redis's unacked set instead of being lost."""

from __future__ import annotations

import pytest
from kombu import Connection, Queue
from kombu.transport import redis as kombu_redis

from worker.broker import TRANSPORT_PATH, OutageTolerantRedisTransport


def channel_with_an_unacked_message(url: str, transport: object) -> tuple[Connection, object]:
    connection = Connection(url, transport=transport)
    channel = connection.channel()
    queue = Queue("dgemma.broker-test", routing_key="dgemma.broker-test")
    queue(channel).declare()
    producer = connection.Producer(channel)
    producer.publish({"job": "j1"}, routing_key="dgemma.broker-test", serializer="json")
    message = queue(channel).get(no_ack=False)
    assert message is not None  # delivered, not acked: it sits in the channel's QoS and Redis's unacked set
    return connection, channel


def tear_down_transport_first(connection: Connection, channel: object) -> None:
    """The order of a broker-loss cleanup in which kombu's restore fails: the transport's client is gone and
    the channel's connection pool was reset before the channel (and its QoS) is closed."""
    channel._disconnect_pools()  # type: ignore[attr-defined]
    connection.transport.client = None


def test_kombus_own_transport_raises_the_attribute_error_that_ended_workers(fresh_redis_url: str):
    connection, channel = channel_with_an_unacked_message(fresh_redis_url, kombu_redis.Transport)
    tear_down_transport_first(connection, channel)
    with pytest.raises(AttributeError, match="hostname"):
        channel.close()  # type: ignore[attr-defined]


def test_the_worker_transport_closes_quietly_and_keeps_the_message_unacked(fresh_redis_url: str, caplog):
    connection, channel = channel_with_an_unacked_message(fresh_redis_url, OutageTolerantRedisTransport)
    tear_down_transport_first(connection, channel)
    channel.close()  # type: ignore[attr-defined]
    assert "1 unacked message(s) stay in Redis's unacked set" in caplog.text
    probe = Connection(fresh_redis_url).channel().client
    assert probe.hlen("unacked") == 1  # kept for kombu's visibility-timeout sweep, not lost
    assert TRANSPORT_PATH == "worker.broker:OutageTolerantRedisTransport"


def test_a_message_acked_after_its_channel_closed_is_left_to_the_sweep(fresh_redis_url: str):
    """A task that ran across a reconnect acks on the channel that delivered it, which is closed by then."""
    connection = Connection(fresh_redis_url, transport=OutageTolerantRedisTransport)
    channel = connection.channel()
    queue = Queue("dgemma.broker-test", routing_key="dgemma.broker-test")
    queue(channel).declare()
    connection.Producer(channel).publish({"job": "j2"}, routing_key="dgemma.broker-test", serializer="json")
    message = queue(channel).get(no_ack=False)
    channel.qos.restore_at_shutdown = False  # keep the delivery unacked through the close, as an outage does
    channel.close()
    message.ack()  # kombu's own QoS would need the closed channel's connection here
    assert Connection(fresh_redis_url).channel().client.hlen("unacked") == 1
