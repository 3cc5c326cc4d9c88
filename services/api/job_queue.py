"""Producer side of the Celery seam: the API sends `dgserve.run_job(job_id)` by task *name* to the model's
queue, so it never imports the worker (nor torch). The payload stays in the job record."""

from __future__ import annotations

from celery import Celery

from services.settings import Settings

RUN_JOB_TASK = "dgserve.run_job"
# kombu's publish retries on a broker hiccup (the API's submit and a worker's re-send of a reclaimed orphan).
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 1.0}


def batch_queue_name(queue_name: str) -> str:
    """The batch-line queue of a model queue. Workers consume both with kombu's `sorted` queue order, so
    every poll (one BRPOP over both lists, which Redis serves in key order) takes an interactive message
    first: this name must sort after the interactive one, which a suffix guarantees."""
    return f"{queue_name}.batch"


class JobQueue:
    """Sends job ids to the model queue over the same Redis broker the workers consume."""

    def __init__(self, settings: Settings):
        self.queue_name = settings.queue_name
        self.celery = Celery("dgserve-api", broker=settings.redis_url, set_as_current=False)
        self.celery.conf.update(
            task_serializer="json",  # never pickle
            accept_content=["json"],
            task_ignore_result=True,
            result_backend=None,
            broker_connection_retry_on_startup=True,
            # Visibility timeout matters to consumers, but kombu reads it on the producer's channel too: the
            # same value as the workers' (DGSERVE_BROKER_VISIBILITY_TIMEOUT_SECONDS or deadline + 10 min).
            broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        )

    def submit(self, job_id: str, batch: bool = False) -> None:
        """Publish one `dgserve.run_job` message carrying only the job id (raises on broker errors); batch
        lines go to the model's batch queue, which workers read only when the interactive one is empty."""
        queue = batch_queue_name(self.queue_name) if batch else self.queue_name
        self.celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, routing_key=queue,
                              retry=True, retry_policy=PUBLISH_RETRY_POLICY)

    def close(self) -> None:
        self.celery.close()
