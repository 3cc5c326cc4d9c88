"""The `dgserve.run_job` task and the Celery signal handlers that start and stop the worker runtime.

The task is thin on purpose: its argument is the job id only (the payload lives in the job record), and the
work happens in `WorkerRuntime.run_job`, which hands the request to the engine-loop thread and waits.
How a run ends decides what happens to the message:
- any terminal state committed (succeeded / failed / cancelled, or a redelivery of a finished job) → ack;
- handed back at shutdown → `Reject(requeue=True)`: not acked, back on the queue for another worker;
- another live attempt holds the job's lease → retried after the lease would have run out, so a job whose
  worker died just now is not dropped and one whose worker lives is not run twice.
Orphans (running jobs whose worker stopped renewing its lease) are requeued by the store and re-sent here by
`resend_job`, from whichever live worker of the queue won the store's compare-and-set.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import signals
from celery.exceptions import Reject

from services.job_messages import batch_queue_name, publish_job
from worker.celery_app import TASK_NAME, app, settings
from worker.runtime import HandBack, RetryLater, begin_shutdown, get_runtime, start_runtime, stop_runtime

logger = logging.getLogger(__name__)
REDIS_RETRY_SECONDS = 2.0


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_job(self: Any, job_id: str) -> str:
    """Run the next job of this message's class (the fair pick, `job_id` when nobody else waits) through the
    engine; returns how it ended."""
    routing_key = (self.request.delivery_info or {}).get("routing_key") or ""
    try:
        return get_runtime().run_job(job_id, batch=routing_key == batch_queue_name(settings.queue_name))
    except HandBack as err:
        logger.info("%s", err)
        raise Reject(str(err), requeue=True) from err
    except RetryLater as err:
        raise self.retry(countdown=err.countdown) from err
    except (redis.ConnectionError, redis.TimeoutError) as err:
        # The job store is unreachable: nothing was decided about the job, so look again shortly
        # rather than ack a message whose job never ran.
        logger.warning("job store unreachable for job %s: %s", job_id, err)
        raise self.retry(countdown=REDIS_RETRY_SECONDS) from err


def resend_job(job_id: str) -> None:
    """Publish `dgserve.run_job(job_id)` by name to this worker's model queue (a reclaimed orphan)."""
    publish_job(app, settings.queue_name, job_id)


@signals.worker_init.connect
def _start_runtime(sender: Any = None, **_: Any) -> None:
    # Load the model in the process that runs the engine, before the worker consumes its first message.
    start_runtime(settings, getattr(sender, "hostname", None), resend_job=resend_job)


@signals.worker_shutting_down.connect
def _begin_shutdown(**_: Any) -> None:
    # SIGTERM: Celery stops consuming; the engine loop finishes in-flight jobs within the grace period.
    begin_shutdown()


@signals.worker_shutdown.connect
def _stop_runtime(**_: Any) -> None:
    stop_runtime()
