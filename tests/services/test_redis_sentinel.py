"""Redis Sentinel and replica acknowledgement: settings, the client factory, the broker configuration, and WAIT
on real redis-servers (a lone one, and a master with a replica). The failover under load is
tests/integration/test_sentinel_failover.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from kombu import Connection
from pydantic import ValidationError

from services.job_messages import JobQueue
from services.jobs import JobStore
from services.redis_options import (
    async_redis_client,
    celery_broker_url,
    sentinel_transport_options,
    sync_redis_client,
)
from services.replication import FENCE_KEY, ReplicationTimeout, confirm_replicated
from services.schemas import GenerateJobCreate
from services.settings import Settings
from tests.support.sentinel_cluster import run_sentinel_cluster
from worker.broker import OutageTolerantQoS, OutageTolerantSentinelChannel, OutageTolerantSentinelTransport
from worker.celery_app import celery_config
from worker.settings import WorkerSettings

SENTINELS = "10.0.0.1:26379,10.0.0.2:26380,[fd00::3]:26381"


def test_sentinel_settings_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DGSERVE_REDIS_SENTINELS", SENTINELS)
    monkeypatch.setenv("DGSERVE_REDIS_MASTER_NAME", "prod-jobs")
    monkeypatch.setenv("DGSERVE_REDIS_SENTINEL_PASSWORD", "s3ntinel-secret")
    monkeypatch.setenv("DGSERVE_REDIS_PASSWORD", "master-secret")
    settings = Settings()
    assert settings.redis_sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("fd00::3", 26381))
    assert settings.redis_master_name == "prod-jobs"
    assert settings.replicas_to_ack == 1  # on by default with sentinels
    assert "secret" not in repr(settings)
    monkeypatch.delenv("DGSERVE_REDIS_SENTINELS")
    assert Settings().replicas_to_ack == 0  # off by default with one Redis
    assert Settings(redis_min_replicas_ack=2).replicas_to_ack == 2


@pytest.mark.parametrize(("field", "value", "message"), [
    ("redis_sentinels", "10.0.0.1", "is not host:port"),
    ("redis_sentinels", "10.0.0.1:0", "is not host:port"),
    ("redis_sentinels", "10.0.0.1:26379,:26380", "is not host:port"),
    ("redis_master_name", "bad name", "String should match pattern"),
    ("redis_min_replicas_ack", -1, "greater than or equal to 0"),
    ("redis_replica_ack_timeout_ms", 3000, "must be below redis_socket_timeout_seconds"),
])
def test_bad_sentinel_settings_are_refused_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{"redis_min_replicas_ack": 1, field: value})
    assert field in str(info.value) and message in str(info.value)


def test_the_wait_timeout_fits_under_the_socket_timeout_by_default() -> None:
    assert Settings().replica_ack_timeout_ms == 1000
    # A short socket timeout (as the outage tests use) is no error: the WAIT takes half of it, and only an
    # explicit timeout at or above it is refused, and only while the WAIT is on.
    assert Settings(redis_socket_timeout_seconds=1.0, redis_min_replicas_ack=1).replica_ack_timeout_ms == 500
    assert Settings(redis_socket_timeout_seconds=1.0, redis_replica_ack_timeout_ms=5000).replicas_to_ack == 0


def test_broker_url_and_transport_options_for_sentinel() -> None:
    settings = Settings(redis_url="redis://ignored-host:1/5", redis_sentinels=SENTINELS, redis_master_name="jobs",
                        redis_password="p@ss:w/rd", redis_sentinel_password="sent")
    assert celery_broker_url(settings) == (
        "sentinel://:p%40ss%3Aw%2Frd@10.0.0.1:26379/5;sentinel://:p%40ss%3Aw%2Frd@10.0.0.2:26380/5;"
        "sentinel://:p%40ss%3Aw%2Frd@[fd00::3]:26381/5")
    options = sentinel_transport_options(settings)
    assert options["master_name"] == "jobs" and options["sentinel_kwargs"]["password"] == "sent"
    connection = Connection(celery_broker_url(settings))  # kombu reads the password back unquoted
    assert connection.password == "p@ss:w/rd" and len(connection.alt) == 3
    # One Redis: the URL as given, or with `redis_password` in place of its own.
    assert celery_broker_url(Settings(redis_url="redis://h:7/2")) == "redis://h:7/2"
    assert celery_broker_url(Settings(redis_url="redis://:old@h:7/2", redis_password="n w")) == "redis://:n%20w@h:7/2"
    assert sentinel_transport_options(Settings()) == {}


def test_workers_use_the_outage_tolerant_sentinel_transport() -> None:
    config = celery_config(WorkerSettings(redis_sentinels="127.0.0.1:26379", redis_master_name="jobs"))
    assert config["broker_url"].startswith("sentinel://127.0.0.1:26379/0")
    assert config["broker_transport_options"]["master_name"] == "jobs"
    assert config["broker_transport_options"]["visibility_timeout"] > 0  # the worker's own options are kept
    transport = Connection(config["broker_url"], transport=config["broker_transport"]).transport_cls
    assert transport == "worker.broker:OutageTolerantSentinelTransport"
    assert OutageTolerantSentinelTransport.Channel is OutageTolerantSentinelChannel
    assert OutageTolerantSentinelChannel.QoS is OutageTolerantQoS
    assert celery_config(WorkerSettings())["broker_transport"] == "worker.broker:OutageTolerantRedisTransport"


def test_a_password_setting_overrides_the_url_for_the_store_client(fresh_redis_url: str) -> None:
    client = sync_redis_client(Settings(redis_url=fresh_redis_url.replace("redis://", "redis://:wrong@"),
                                        redis_password="right"))
    assert client.connection_pool.connection_kwargs["password"] == "right"
    assert client.connection_pool.connection_kwargs["db"] == int(fresh_redis_url.rsplit("/", 1)[1])
    plain = sync_redis_client(Settings(redis_url=fresh_redis_url))
    assert plain.ping() and plain.connection_pool.connection_kwargs.get("password") is None


def test_without_replicas_a_wait_is_refused_and_the_write_stays(fresh_redis_url: str) -> None:
    client = redis.Redis.from_url(fresh_redis_url, decode_responses=True)
    assert confirm_replicated(client, 0, 50) == 0 and client.get(FENCE_KEY) is None  # off: not even the fence
    started = time.monotonic()
    with pytest.raises(ReplicationTimeout, match="only 0 of 1 replica"):
        confirm_replicated(client, 1, 100)
    assert 0.09 < time.monotonic() - started < 2.0  # WAIT blocked for its timeout, not the socket timeout
    assert isinstance(ReplicationTimeout("x"), redis.ConnectionError)  # callers treat it as an outage
    # A terminal write is committed on the master but not acknowledged: the worker's writer retries it.
    store = JobStore(client, Settings(redis_url=fresh_redis_url, redis_min_replicas_ack=1,
                                      redis_replica_ack_timeout_ms=50))
    job_id = store.create(GenerateJobCreate(prompt="p")).job_id
    store.try_start(job_id, "w")
    with pytest.raises(ReplicationTimeout):
        store.succeed(job_id, {"text": "t"})
    assert store.get(job_id).status == "succeeded"
    with pytest.raises(ReplicationTimeout):  # the retry: refused (already committed), still not confirmed
        store.succeed(job_id, {"text": "t"})


def test_api_refuses_to_acknowledge_a_job_no_replica_confirmed(start_api) -> None:
    api = start_api(redis_min_replicas_ack=1, redis_replica_ack_timeout_ms=100)
    response = api.http.post("/v1/jobs", json={"prompt": "hello"}, headers={"Idempotency-Key": "k-1"})
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == str(api.settings.retry_after_seconds)
    assert response.json()["error"]["code"] == "not_replicated"
    assert "Idempotency-Key" in response.json()["error"]["message"]
    assert 'reason="not_replicated"} 1.0' in api.http.get("/metrics").text


def test_with_a_replica_a_202_means_the_replica_holds_the_job_and_its_message(
        tmp_path: Path, start_api) -> None:
    with run_sentinel_cluster(tmp_path, replicas=1, sentinels=0) as cluster:
        api = start_api(redis_url=f"redis://127.0.0.1:{cluster.master.port}/0", redis_min_replicas_ack=1)
        replica = cluster.replicas[0].client()
        for n in range(5):
            response = api.http.post("/v1/jobs", json={"prompt": f"job {n}"})
            assert response.status_code == 202, response.text
            # Read from the replica right after the 202: the record and the Celery message are there already.
            assert replica.hget(f"job:{response.json()['id']}", "status") == "queued"
            assert replica.llen(api.settings.queue_name) == n + 1


@pytest.mark.integration
def test_clients_and_broker_follow_the_master_through_a_failover(tmp_path: Path) -> None:
    with run_sentinel_cluster(tmp_path) as cluster:
        settings = Settings(redis_url="redis://unused:1/3", redis_sentinels=cluster.sentinel_addresses,
                            redis_master_name=cluster.master_name, queue_name="q-failover")
        store, queue = JobStore.from_settings(settings), JobQueue(settings)
        job_id = store.create(GenerateJobCreate(prompt="before")).job_id
        queue.submit(job_id)
        store.confirm_replicated()
        old_port = cluster.kill_master().port
        deadline, errors = time.monotonic() + 30, set()
        while time.monotonic() < deadline:  # what the API does on each request: fail fast until promoted
            try:
                after = store.create(GenerateJobCreate(prompt="after")).job_id
                queue.submit(after)
                store.confirm_replicated()
                break
            except redis.ConnectionError as err:
                errors.add(type(err).__name__)
                time.sleep(0.1)
        else:
            pytest.fail(f"no write went through within 30 s of the kill ({errors})")
        new_master = cluster.wait_for_new_master(old_port, 10)
        assert errors and errors <= {"ConnectionError", "MasterNotFoundError", "ReplicationTimeout"}
        direct = redis.Redis(host="127.0.0.1", port=new_master.port, db=3, decode_responses=True)
        assert store.get(job_id).status == "queued" and store.get(after).status == "queued"
        assert direct.llen("q-failover") == 2  # both Celery messages, in the database of redis_url

        async def read_async() -> str | None:
            client = async_redis_client(settings)
            try:
                return await client.hget(JobStore.job_key(after), "status")
            finally:
                await client.aclose()

        assert asyncio.run(read_async()) == "queued"
        queue.close()


@pytest.mark.integration
def test_a_script_write_to_a_demoted_master_is_an_outage_not_a_script_error(tmp_path: Path) -> None:
    """A master demoted while the store's pooled connection stays open to it (here by hand, so no sentinel
    kills the connection): Redis 6 answers a job-store write (a Lua script) with a script error that wraps
    READONLY. It must surface as a ConnectionError, which the worker retries until the sentinels name the new
    master, and never as a script error, which the worker would log and skip (a dropped write)."""
    with run_sentinel_cluster(tmp_path, replicas=1, sentinels=1) as cluster:
        settings = Settings(redis_sentinels=cluster.sentinel_addresses, redis_master_name=cluster.master_name,
                            queue_name="q-demote")
        store = JobStore.from_settings(settings)
        job_id = store.create(GenerateJobCreate(prompt="before")).job_id  # opens the pooled connection
        replica = cluster.replicas[0]
        replica.client().execute_command("REPLICAOF", "NO", "ONE")
        cluster.master.client().execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
        with pytest.raises(redis.ConnectionError, match="demoted to a replica"):
            store.append_event(job_id, "note", {"after": "demotion"})
