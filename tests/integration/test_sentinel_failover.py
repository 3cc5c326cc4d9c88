"""Fault test: the Redis master is killed (kill -9) while a worker has jobs in flight, and Sentinel promotes a
replica. Real parts only: a master, two replicas and three sentinels (redis-server processes on loopback), the
API under uvicorn and a `python -m worker` process, all configured with `DGSERVE_REDIS_SENTINELS` and the
default replica acknowledgement (WAIT for one replica before a 202 and after every terminal write).

Two replicas, as in production: after the promotion the other one follows the new master, so one replica can
confirm writes again (with a single replica nothing could be acknowledged until the old master came back).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from services.jobs import JobStore
from services.settings import Settings
from tests.integration.conftest import (
    WorkerProcess,
    api_and_worker,
    store_event_types,
)
from tests.support.processes import (
    wait_until,
)
from tests.support.sentinel_cluster import SentinelCluster, run_sentinel_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(480)]

QUEUE = "dgemma.itest-failover"
CONCURRENCY = 4
JOBS = 6  # 4 running at the kill, 2 queued behind them
JOB_BODY = {"max_new_tokens": 384, "stream_drafts": True}  # several canvases: in flight across the failover
PROBE_BODY = {"prompt": "during the failover", "max_new_tokens": 8}
RECOVERY_LIMIT_S = 60.0


@dataclass
class FailoverStack:
    cluster: SentinelCluster
    api_url: str
    worker: WorkerProcess
    store: JobStore


@dataclass
class Probes:
    """What the API answered after the kill, until it answered a submission with 202 again."""

    codes: dict[str, list[int]] = field(default_factory=lambda: {"post": [], "get": [], "readyz": []})
    missing_retry_after: int = 0  # 503s of the job routes without a Retry-After header
    accepted: list[str] = field(default_factory=list)  # probe submissions answered 202
    api_recovered_s: float | None = None
    promoted_s: float | None = None


@pytest.fixture
def failover_stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[FailoverStack]:
    with run_sentinel_cluster(tmp_path / "redis") as cluster:
        redis_env = {"DGSERVE_REDIS_URL": "redis://127.0.0.1/0", "DGSERVE_REDIS_SENTINELS": cluster.sentinel_addresses,
                     "DGSERVE_REDIS_MASTER_NAME": cluster.master_name}
        with api_and_worker(redis_env, tiny_model_dir, tmp_path, QUEUE, CONCURRENCY, "failover") as (api_url, worker):
            store = JobStore.from_settings(Settings(redis_sentinels=cluster.sentinel_addresses, queue_name=QUEUE,
                                                    redis_master_name=cluster.master_name, job_lease_seconds=5))
            yield FailoverStack(cluster, api_url, worker, store)


def test_jobs_accepted_before_a_master_kill_finish_exactly_once_after_failover(failover_stack: FailoverStack):
    stack = failover_stack
    client = httpx.Client(base_url=stack.api_url, timeout=10)
    wait_until(lambda: client.get("/readyz").status_code == 200, 60, interval=0.1, what="ready before")
    accepted = []
    for index in range(JOBS):
        response = client.post("/v1/jobs", json={"prompt": f"fail over {index}", "seed": index, **JOB_BODY})
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])
    wait_until(lambda: sum("draft" in store_event_types(stack.store, job_id) for job_id in accepted) >= CONCURRENCY,
               120, interval=0.1, what="a full batch of jobs in flight")
    statuses = Counter(stack.store.get(job_id).status for job_id in accepted)

    old_master = stack.cluster.kill_master()
    probes = probe_until_recovered(client, stack.cluster, old_master.port, accepted[0])
    stack.cluster.wait_for_new_master(old_master.port, 10)
    assert stack.worker.process.poll() is None, stack.worker.log()

    every_accepted = accepted + probes.accepted
    wait_until(lambda: all(stack.store.get(job_id).is_finished for job_id in every_accepted), 300, interval=0.2,
               what="every accepted job finished")
    wait_until(lambda: client.get("/readyz").status_code == 200, 30, interval=0.1, what="ready after")
    log = stack.worker.log_path.read_text(errors="replace")
    assert stack.worker.process.poll() is None and "Unrecoverable error" not in log, log[-4000:]

    jobs = {job_id: stack.store.get(job_id) for job_id in every_accepted}
    done_events = {job_id: store_event_types(stack.store, job_id).count("done") for job_id in every_accepted}
    lost = [job_id for job_id, job in jobs.items() if job.status != "succeeded"]
    duplicated = [job_id for job_id, count in done_events.items() if count != 1]
    print(f"failover figures: running at the kill {statuses['running']}, queued {statuses['queued']}; sentinels "
          f"promoted a replica after {probes.promoted_s:.1f} s; the API accepted jobs again after "
          f"{probes.api_recovered_s:.1f} s; lost {len(lost)}, duplicated {len(duplicated)} of {len(jobs)} "
          f"accepted; attempts {sorted(job.attempts for job in jobs.values())}; probe codes "
          f"{ {name: dict(Counter(codes)) for name, codes in probes.codes.items()} }")
    assert statuses["running"] >= 1, statuses  # the kill really hit jobs in flight
    assert lost == [] and duplicated == [], ({job_id: (jobs[job_id].status, jobs[job_id].error) for job_id in lost},
                                             duplicated)
    for job in jobs.values():
        assert len(job.result["token_ids"]) == job.result["usage"]["generated_tokens"] > 0

    # During the failover the API said 503 with Retry-After (never a 500, never a dropped connection), and
    # answered 202 and 200 again once a replica was promoted.
    assert 503 in probes.codes["post"] and probes.missing_retry_after == 0, probes
    assert set(probes.codes["post"]) <= {202, 503} and set(probes.codes["get"]) <= {200, 503}, probes
    assert set(probes.codes["readyz"]) <= {200, 503}, probes
    assert probes.codes["post"][-1] == 202 and probes.codes["get"][-1] == 200, probes


def probe_until_recovered(client: httpx.Client, cluster: SentinelCluster, old_port: int, job_id: str) -> Probes:
    """POST /v1/jobs, GET /v1/jobs/{id} and /readyz every 0.2 s after the kill until a submission is accepted and
    the job reads 200 again (at most RECOVERY_LIMIT_S)."""
    probes, killed_at = Probes(), time.monotonic()
    requests = {"post": ("POST", "/v1/jobs", PROBE_BODY), "get": ("GET", f"/v1/jobs/{job_id}", None),
                "readyz": ("GET", "/readyz", None)}
    while time.monotonic() - killed_at < RECOVERY_LIMIT_S:
        for name, (method, path, body) in requests.items():
            try:
                response = client.request(method, path, json=body)
            except httpx.TransportError:
                probes.codes[name].append(0)
                continue
            probes.codes[name].append(response.status_code)
            if name != "readyz" and response.status_code == 503 and "retry-after" not in response.headers:
                probes.missing_retry_after += 1
            if name == "post" and response.status_code == 202:
                probes.accepted.append(response.json()["id"])
                if probes.api_recovered_s is None:
                    probes.api_recovered_s = time.monotonic() - killed_at
        if probes.promoted_s is None and cluster.master_port_by_sentinels() - {old_port}:
            probes.promoted_s = time.monotonic() - killed_at
        if probes.codes["post"][-1] == 202 and probes.codes["get"][-1] == 200:
            return probes
        time.sleep(0.2)
    raise AssertionError(f"the API did not accept a job within {RECOVERY_LIMIT_S} s of the kill: {probes}")
