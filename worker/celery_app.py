"""The Celery application of the worker: every Celery and kombu setting lives here.

Why each setting (the delivery guarantees are in docs/architecture.md, "worker"):
- JSON only: a message from Redis is never unpickled.
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acked only after the job's terminal state is
  committed; a worker that dies mid-job leaves it unacked. Its job is recovered long before kombu restores
  that message (after `visibility_timeout`): a live worker's orphan reaper requeues the job once its lease
  lapses and re-sends it (worker.runtime); the late restored message then finds it finished or running
  elsewhere. The job store's lease and attempts counter keep that to one live run and dead-letter the job
  after `max_attempts`.
- `worker_prefetch_multiplier=1` with concurrency = the engine's canvases in flight: the worker holds no more
  unacked jobs than it can batch; the rest stay in Redis for other workers.
- `visibility_timeout` (a broker transport option: the only place kombu reads it; there is no result backend)
  above the job deadline, or kombu would redeliver jobs that are still running.
- Broker outages (a Redis restart, a network blip): `broker_transport` is `worker.broker`'s subclass of
  kombu's Redis transport, whose hand-back of unacked messages while the connection is down cannot end the
  worker (the module explains the kombu failure it works around); `broker_connection_max_retries=None` makes
  the consumer reconnect for as long as it takes, and running tasks are not cancelled on connection loss, so
  the engine and its jobs ride the outage out.
- Redis Sentinel (`DGSERVE_REDIS_SENTINELS`): the broker URL is kombu's `sentinel://host:port;...` form with
  `master_name` in the transport options (services.redis_options), and the transport is the same outage-tolerant
  subclass of kombu's Sentinel transport, so a failover is one more broker outage: the consumer reconnects,
  asks the sentinels for the new master and carries on.
- Time limits are not enforced by the threads pool: deadlines and cancels are cooperative in the engine loop.

The app is built from `WorkerSettings` at import time (Celery's `-A worker.celery_app` imports this module);
`make_celery_app(settings)` builds one explicitly.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from services.job_messages import RUN_JOB_TASK, batch_queue_name
from services.redis_options import celery_broker_url, sentinel_transport_options, uses_sentinel
from worker.broker import SENTINEL_TRANSPORT_PATH, TRANSPORT_PATH
from worker.settings import WorkerSettings

TASK_NAME = RUN_JOB_TASK  # the name the API publishes to (services never import the worker)


def broker_transport_options(settings: WorkerSettings) -> dict:
    return {
        **sentinel_transport_options(settings),  # with sentinels: master_name and the sentinels' credentials
        "visibility_timeout": settings.visibility_timeout_seconds,
        # Sweep for abandoned messages every `broker_restore_interval_seconds`, not every 10 x interval.
        "unacked_restore_interval": settings.broker_restore_interval_seconds,
        "unacked_restore_throttle": 1,
        # Interactive before batch (docs/architecture.md, "Queue classes"): BRPOP lists the queues in sorted
        # order and Redis pops from the first non-empty one, and `<queue>` sorts before `<queue>.batch`.
        "queue_order_strategy": "sorted",
    }


def celery_config(settings: WorkerSettings) -> dict:
    """The complete Celery configuration of a dgserve worker."""
    transport_options = broker_transport_options(settings)
    return {
        "broker_url": celery_broker_url(settings),
        "broker_transport": SENTINEL_TRANSPORT_PATH if uses_sentinel(settings) else TRANSPORT_PATH,
        "result_backend": None,  # results live in the job record; the task's return value is not needed
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,  # a task that raised has already failed its job in the store
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_pool": "threads",
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # a worker never gives up on its broker: its jobs are alive
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,  # `celery events` / Flower see each task (received, started, done)
        "task_default_queue": settings.queue_name,
        "task_queues": (Queue(settings.queue_name, routing_key=settings.queue_name),
                        Queue(batch_queue_name(settings.queue_name),
                              routing_key=batch_queue_name(settings.queue_name))),
        "task_routes": {TASK_NAME: {"queue": settings.queue_name}},
        "task_create_missing_queues": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_timeout": 5,
    }


def make_celery_app(settings: WorkerSettings) -> Celery:
    app = Celery("dgserve-worker", set_as_current=True)
    app.conf.update(celery_config(settings))
    app.conf.include = ["worker.tasks"]
    return app


settings = WorkerSettings()
app = make_celery_app(settings)
