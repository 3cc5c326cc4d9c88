"""Worker parts that need no model: metrics exposition, the heartbeat record and readiness, the store-writer
thread against a real Redis job store, Celery configuration, the launcher's environment and job preparation."""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request

import pytest

from services.jobs import WORKER_INFO_KEY, WORKERS_KEY, JobStore
from services.schemas import GenerateJobCreate
from services.settings import Settings
from tests.support.processes import free_port
from worker.__main__ import celery_argv, parse_args, worker_environment
from worker.celery_app import TASK_NAME, celery_config
from worker.heartbeat import Heartbeat
from worker.metrics import MetricLabels, WorkerMetrics, process_memory_bytes
from worker.settings import WorkerSettings
from worker.store_writer import StoreWriter

WORKER_METRIC_NAMES = (
    "dgserve_generated_tokens_total", "dgserve_denoising_steps_total", "dgserve_canvases_total",
    "dgserve_steps_per_canvas_bucket", "dgserve_batch_size_canvases_bucket", "dgserve_forward_seconds_bucket",
    "dgserve_job_e2e_seconds_bucket", "dgserve_job_queue_wait_seconds_bucket", "dgserve_job_run_seconds_bucket",
    "dgserve_requests_running", "dgserve_requests_waiting", "dgserve_gpu_memory_used_bytes",
    "dgserve_gpu_memory_total_bytes",
)


def test_metrics_endpoint_serves_documented_names_without_job_ids():
    metrics = WorkerMetrics(MetricLabels(model="tiny", gpu="cpu"))
    metrics.observe_step(num_denoising_canvases=3, forward_seconds=0.004)
    metrics.observe_canvas("generate", num_tokens=32, num_steps=7)
    metrics.observe_job("generate", "succeeded", e2e_seconds=0.5, queue_wait_seconds=0.1, run_seconds=0.4)
    metrics.set_load(num_running=2, num_waiting=1)
    metrics.set_memory(*process_memory_bytes())
    port = free_port()
    server = metrics.serve(port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    for name in WORKER_METRIC_NAMES:
        assert name in body, name
    assert 'dgserve_generated_tokens_total{gpu="cpu",kind="generate",model="tiny"} 32.0' in body
    assert 'dgserve_batch_size_canvases_bucket{gpu="cpu",le="3.0",model="tiny"} 1.0' in body
    assert "job_id" not in body
    rss, ram = process_memory_bytes()
    assert 0 < rss < ram


def test_job_latency_buckets_span_10ms_to_7680s():
    from prometheus_client import generate_latest

    metrics = WorkerMetrics(MetricLabels(model="m", gpu="0"))
    metrics.observe_job("edit", "failed", e2e_seconds=9000.0, queue_wait_seconds=None, run_seconds=None)
    body = generate_latest(metrics.registry).decode()
    assert 'dgserve_job_e2e_seconds_bucket{gpu="0",kind="edit",le="0.01",model="m"} 0.0' in body
    assert 'dgserve_job_e2e_seconds_bucket{gpu="0",kind="edit",le="7680.0",model="m"} 0.0' in body
    assert 'dgserve_job_e2e_seconds_bucket{gpu="0",kind="edit",le="+Inf",model="m"} 1.0' in body
    assert 'dgserve_job_run_seconds_count{' not in body  # a job that never ran has no run time


def test_prefix_cache_and_kv_block_series_follow_the_engine_totals():
    from prometheus_client import generate_latest

    from engine.block_manager import PrefixCacheStats

    metrics = WorkerMetrics(MetricLabels(model="m", gpu="0"))
    for queried, hit, evicted, used in ((100, 48, 0, 7), (300, 208, 5, 3)):
        metrics.set_kv(PrefixCacheStats(query_tokens=queried, hit_tokens=hit, evicted_blocks=evicted,
                                        full_blocks_used=used, full_blocks_total=40, sliding_blocks_used=2,
                                        sliding_blocks_total=16))
    body = generate_latest(metrics.registry).decode()
    assert 'dgserve_prefix_cache_queries_total{gpu="0",model="m"} 300.0' in body
    assert 'dgserve_prefix_cache_hits_total{gpu="0",model="m"} 208.0' in body
    assert 'dgserve_prefix_cache_evictions_total{gpu="0",model="m"} 5.0' in body
    assert 'dgserve_kv_blocks_used{gpu="0",model="m",pool="full"} 3.0' in body
    assert 'dgserve_kv_blocks_total{gpu="0",model="m",pool="sliding"} 16.0' in body


def test_live_workers_are_records_of_the_running_redis_written_within_three_beats(fresh_redis_url):
    store = JobStore.from_settings(Settings(redis_url=fresh_redis_url, model="tiny-test", job_lease_seconds=60))
    beat = Heartbeat(store, "w-live", {"queue": store.settings.queue_name}, interval_s=0.2)
    beat.beat()
    (live,) = store.live_workers()
    assert live["worker_id"] == "w-live" and live["beat_interval_s"] == 0.2
    assert live["redis_run_id"] == store.redis.info("server")["run_id"]
    # A record restored from the AOF after a restart carries the run id of the server that wrote it.
    store.redis.zadd(WORKERS_KEY, {"w-restored": time.time()})
    store.redis.hset(WORKER_INFO_KEY, "w-restored", json.dumps({"redis_run_id": "0" * 40, "beat_interval_s": 2}))
    assert [w["worker_id"] for w in store.live_workers()] == ["w-live"]
    # A worker that stopped beating stops counting after three of its intervals, long before the TTL.
    time.sleep(3 * 0.2 + 0.1)
    assert store.live_workers() == []
    beat.beat()
    assert len(store.live_workers()) == 1
    beat.remove()  # a clean shutdown
    assert store.live_workers() == []
    with pytest.raises(ValueError, match="interval"):
        Heartbeat(store, "w", {}, interval_s=0)


def test_store_writer_keeps_order_and_skips_a_broken_write(fresh_redis_url):
    settings = Settings(redis_url=fresh_redis_url, model="tiny-test")
    store = JobStore.from_settings(settings)
    job_id = store.create(GenerateJobCreate(prompt="hello")).job_id
    assert store.try_start(job_id, "w1").should_run
    writer = StoreWriter()
    writer.start()
    for step in range(1, 6):
        writer.submit(lambda step=step: store.append_event(job_id, "draft", {"step": step}))
        if step == 3:
            writer.submit(lambda: 1 / 0)  # a bug in one write: logged and skipped, the others go on
    writer.submit(lambda: store.succeed(job_id, {"text": "x"}))
    writer.stop()
    events = store.redis.xrange(store.events_key(job_id))
    types = [fields["type"] for _, fields in events]
    assert types == ["queued", "started", *["draft"] * 5, "done"]
    steps = [fields["data"] for _, fields in events if fields["type"] == "draft"]
    assert steps == [f'{{"step": {i}}}' for i in range(1, 6)]
    with pytest.raises(RuntimeError):
        writer.submit(lambda: None)


def test_celery_config_is_json_only_acks_late_and_sized_to_the_engine():
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", model="/models/tiny", worker_concurrency=8,
                              job_deadline_seconds=300)
    conf = celery_config(settings)
    assert conf["task_serializer"] == "json" and conf["accept_content"] == ["json"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1 and conf["worker_concurrency"] == 8
    assert conf["broker_transport_options"]["visibility_timeout"] > settings.job_deadline_seconds
    assert "visibility_timeout" not in conf and "result_backend_transport_options" not in conf  # kombu never reads them
    assert conf["broker_transport"] == "worker.broker:OutageTolerantRedisTransport"
    assert conf["broker_connection_max_retries"] is None
    assert conf["task_routes"][TASK_NAME]["queue"] == "dgemma.tiny"


def test_launcher_pins_the_card_before_torch_and_passes_options():
    args = parse_args(["--gpu", "3", "--model", "/m/tiny", "--concurrency", "4", "--metrics-port", "9500"])
    env = worker_environment(args, {"PATH": os.environ.get("PATH", "")})
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["DGSERVE_WORKER_DEVICE"] == "cuda"
    assert env["DGSERVE_MODEL"] == "/m/tiny" and env["DGSERVE_WORKER_CONCURRENCY"] == "4"
    assert env["DGSERVE_WORKER_METRICS_PORT"] == "9500"
    argv = celery_argv(args, 4, "dgemma.tiny")
    assert argv[argv.index("--pool") + 1] == "threads" and argv[argv.index("--queues") + 1] == "dgemma.tiny,dgemma.tiny.batch"
    cpu_env = worker_environment(parse_args(["--cpu"]), {})
    assert cpu_env["CUDA_VISIBLE_DEVICES"] == "" and cpu_env["DGSERVE_WORKER_DEVICE"] == "cpu"
    with pytest.raises(SystemExit):
        parse_args(["--gpu", "0", "--cpu"])
    assert isinstance(args, argparse.Namespace)


def test_job_usage_reports_cached_prompt_tokens():
    from engine.types import RequestStats
    from worker.edit_jobs import usage_of

    stats = RequestStats(prompt_tokens=70, generated_tokens=32, canvases=1, denoising_steps=4, steps_per_canvas=4.0,
                         queue_seconds=0.0, prefill_seconds=0.1, run_seconds=0.2, cached_prompt_tokens=64)
    assert usage_of(stats) == {"prompt_tokens": 70, "generated_tokens": 32, "canvases": 1, "denoising_steps": 4,
                               "steps_per_canvas": 4.0, "cached_prompt_tokens": 64}
