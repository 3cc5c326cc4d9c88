"""The worker's store-side threads across a real Redis restart (kill -9, started again on the same port with
the same AOF): the store writer keeps every write and their order, the lease keeper skips its passes while
Redis is down and renews before it reaps when Redis is back, and the outage is logged once each way."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from services.jobs import JobStore
from services.schemas import GenerateJobCreate
from services.settings import Settings
from tests.support.processes import wait_until
from tests.support.redis_server import RestartableRedis
from worker.leases import LeaseKeeper
from worker.outage import StoreOutage
from worker.store_writer import StoreWriter

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def restartable_redis(tmp_path: Path):
    server = RestartableRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def store_of(server: RestartableRedis, ttl_s: int = 1) -> JobStore:
    settings = Settings(redis_url=server.url, model="tiny-test", job_lease_seconds=ttl_s)
    store = JobStore.from_settings(settings)
    store.redis.connection_pool.connection_kwargs["socket_connect_timeout"] = 0.5
    return store


def test_writes_wait_through_a_restart_and_land_in_order(restartable_redis: RestartableRedis,
                                                         caplog: pytest.LogCaptureFixture):
    store = store_of(restartable_redis)
    job_id = store.create(GenerateJobCreate(prompt="hello")).job_id
    assert store.try_start(job_id, "w1").should_run
    writer = StoreWriter()
    writer.start()
    with caplog.at_level(logging.WARNING, logger="worker.outage"):
        writer.submit(lambda: store.append_event(job_id, "draft", {"step": 1}))
        wait_until(lambda: len(store.redis.xrange(store.events_key(job_id))) == 3, 10, what="first write")
        restartable_redis.kill()
        for step in range(2, 30):
            writer.submit(lambda step=step: store.append_event(job_id, "draft", {"step": step}))
        writer.submit(lambda: store.succeed(job_id, {"text": "x"}))
        time.sleep(1.5)  # the writer keeps retrying meanwhile
        assert writer.outage.is_down
        restartable_redis.start()
        writer.stop(timeout_s=30)
    events = store.redis.xrange(store.events_key(job_id))
    assert [fields["type"] for _, fields in events] == ["queued", "started", *["draft"] * 29, "done"]
    assert [fields["data"] for _, fields in events if fields["type"] == "draft"] == [
        f'{{"step": {i}}}' for i in range(1, 30)]
    assert store.get(job_id).status == "succeeded"
    messages = [record.getMessage() for record in caplog.records]
    assert sum("job store unreachable" in m for m in messages) == 1, messages
    assert sum("job store reachable again" in m for m in messages) == 1, messages


def test_after_an_outage_leases_are_renewed_before_anyone_reaps(restartable_redis: RestartableRedis):
    """Every lease lapsed during an outage longer than the lease: a reaper that ran first would take live
    jobs from their workers. The keeper renews its own at once and reaps only a lease length later."""
    store = store_of(restartable_redis, ttl_s=1)
    ours = store.create(GenerateJobCreate(prompt="kept")).job_id
    orphan = store.create(GenerateJobCreate(prompt="its worker died")).job_id
    assert store.try_start(ours, "w-live").should_run and store.try_start(orphan, "w-dead").should_run
    outage, reaped, lost = StoreOutage(), [], []
    keeper = LeaseKeeper(store, "w-live", outage, progress_of=lambda job_id: (0, 1), loop_stalled_s=lambda: 0.0,
                         on_cancel=lambda job_id: None, on_lease_lost=lost.append,
                         reap_orphans=lambda: reaped.extend(store.reclaim_orphans()),
                         interval_s=0.1, reap_grace_s=1.0)
    keeper.watch(ours)
    restartable_redis.kill()
    keeper.run_pass()
    assert outage.is_down and reaped == []
    time.sleep(1.2)  # both leases lapse
    restartable_redis.start()
    keeper.run_pass()  # back: renews ours, does not reap yet
    assert not outage.is_down and reaped == [] and store.get(ours).worker_id == "w-live"
    time.sleep(1.0)
    keeper.run_pass()
    assert reaped == [orphan] and lost == []
    assert store.get(ours).status == "running" and store.get(orphan).status == "queued"


def test_cancel_flags_and_lost_leases_reach_the_loop_once(restartable_redis: RestartableRedis):
    store = store_of(restartable_redis, ttl_s=5)
    job_id = store.create(GenerateJobCreate(prompt="cancel me")).job_id
    taken = store.create(GenerateJobCreate(prompt="taken over")).job_id
    assert store.try_start(job_id, "w1").should_run and store.try_start(taken, "w1").should_run
    cancels: list[str] = []
    lost: list[str] = []
    keeper = LeaseKeeper(store, "w1", StoreOutage(), progress_of=lambda job_id: (0, 1),
                         loop_stalled_s=lambda: 0.0, on_cancel=cancels.append, on_lease_lost=lost.append,
                         interval_s=0.05, cancel_poll_s=0.02)
    keeper.watch(job_id)
    keeper.watch(taken)
    keeper.start()
    try:
        assert store.cancel(job_id) == "cancel_requested"
        assert store.release(taken, "w1", "taken_over_by_test")
        wait_until(lambda: cancels == [job_id] and lost == [taken], 10, what="cancel and lease loss seen")
        time.sleep(0.3)  # several more polls: each is reported once
    finally:
        keeper.stop()
    assert cancels == [job_id] and lost == [taken]
