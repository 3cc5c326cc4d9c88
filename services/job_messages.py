"""The Celery seam, shared by both sides: the task name, the publish retry policy and the one function
that publishes a job message. The API sends `dgserve.run_job(job_id)` by task *name* to the model's queue
(so services never import the worker, nor torch); a worker re-sends a reclaimed orphan with the same
function. The payload stays in the job record: the message carries the job id only."""

from __future__ import annotations

from celery import Celery

from services.redis_options import celery_broker_url, sentinel_transport_options
from services.settings import Settings

RUN_JOB_TASK = "dgserve.run_job"
# kombu's publish retries on a broker hiccup (the API's submit and a worker's re-send of a reclaimed orphan).
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 1.0}


def batch_queue_name(queue_name: str) -> str:
    """The batch-line queue of a model queue. Workers consume both with kombu's `sorted` queue order, so
    every poll (one BRPOP over both lists, which Redis serves in key order) takes an interactive message
    first: this name must sort after the interactive one, which a suffix guarantees (docs/architecture.md,
    "Queue classes")."""
    return f"{queue_name}.batch"


def publish_job(celery: Celery, queue_name: str, job_id: str) -> None:
    """Publish one `dgserve.run_job(job_id)` message to `queue_name` (raises on broker errors)."""
    celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_name, routing_key=queue_name,
                     retry=True, retry_policy=PUBLISH_RETRY_POLICY)


class JobQueue:
    """The API's producer: sends job ids to the model queue over the Redis broker the workers consume."""

    def __init__(self, settings: Settings):
        self.queue_name = settings.queue_name
        self.celery = Celery("dgserve-api", broker=celery_broker_url(settings), set_as_current=False)
        self.celery.conf.update(
            task_serializer="json",  # never pickle
            accept_content=["json"],
            task_ignore_result=True,
            result_backend=None,
            broker_connection_retry_on_startup=True,
            # Visibility timeout matters to consumers, but kombu reads it on the producer's channel too: the
            # same value as the workers' (DGSERVE_BROKER_VISIBILITY_TIMEOUT_SECONDS or deadline + 10 min).
            # The socket timeouts keep a stalled Redis from hanging a submission (as for the job store).
            broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds,
                                      "socket_timeout": settings.redis_socket_timeout_seconds,
                                      "socket_connect_timeout": settings.redis_socket_timeout_seconds,
                                      **sentinel_transport_options(settings)},  # master_name with sentinels
        )

    def submit(self, job_id: str, batch: bool = False) -> None:
        """Publish the job's message (raises on broker errors); batch lines go to the model's batch queue,
        which workers read only when the interactive one is empty."""
        publish_job(self.celery, batch_queue_name(self.queue_name) if batch else self.queue_name, job_id)

    def close(self) -> None:
        self.celery.close()
