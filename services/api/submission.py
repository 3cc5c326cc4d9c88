"""Accepting a job: deployment limits → record (admission + idempotency, atomically) → Celery message.
Shared by `POST /v1/jobs` and the OpenAI-compatible routes. Nothing is enqueued for a refused request."""

from __future__ import annotations

import logging

from dgtext.checkpoint_files import CheckpointError
from services.api.deps import AppServices
from services.api.errors import ApiError
from services.job_record import JobRecord
from services.jobs import IdempotencyConflict, KeyLimitExceeded, QueueFull
from services.key_limits import parse_key_limits
from services.prompt_limits import LimitExceeded
from services.replication import ReplicationTimeout
from services.schemas import EditJobCreate, GenerateJobCreate

logger = logging.getLogger(__name__)


# The 429 codes of the per-key limits (services/key_limits.py), by the limit the store names.
KEY_LIMIT_CODES = {"max_queued_jobs": "key_queued_limit", "tokens_per_minute": "key_tokens_limit"}


def check_limits(services: AppServices, job: GenerateJobCreate | EditJobCreate) -> int:
    """422 naming the field for a request over a `Settings` limit; 503 if the tokenizer cannot be loaded.
    Returns the request's token cost (prompt + generation budget) for the per-key tokens-per-minute limit."""
    try:
        return services.limits.check(job)
    except LimitExceeded as exc:
        services.metrics.job_rejected(exc.reason)
        raise ApiError(422, "invalid_request", str(exc), field=exc.field) from exc
    except CheckpointError as exc:
        logger.error("cannot load the tokenizer of %s: %s", services.settings.model, exc)
        raise ApiError(503, "tokenizer_unavailable", "the model's tokenizer cannot be loaded; see the API log",
                       headers={"Retry-After": str(services.settings.retry_after_seconds)}) from exc


def accept_job(services: AppServices, job: GenerateJobCreate | EditJobCreate, owner: str,
               idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
    """Store and enqueue `job`; returns (record, created). `created` is False for an idempotent replay,
    which is not enqueued again."""
    token_cost = check_limits(services, job)
    settings = services.settings
    tokens_per_minute = parse_key_limits(settings.key_limits).for_owner(owner).tokens_per_minute
    if tokens_per_minute is not None and token_cost > tokens_per_minute:
        services.metrics.job_rejected("invalid")  # waiting cannot help: a 422, not a 429
        raise ApiError(422, "invalid_request", f"max_new_tokens: this request counts {token_cost} tokens (prompt "
                       f"+ max_new_tokens), more than this key may submit in a minute ({tokens_per_minute}, "
                       "key_limits tpm:N)", field="max_new_tokens")
    retry_after = {"Retry-After": str(settings.retry_after_seconds)}
    if settings.max_jobs_per_minute_per_key:
        count, seconds_left = services.store.count_submission(owner)
        if count > settings.max_jobs_per_minute_per_key:
            services.metrics.job_rejected("rate_limited")
            raise ApiError(429, "rate_limited", f"this key made {settings.max_jobs_per_minute_per_key} submissions "
                           f"this minute (max_jobs_per_minute_per_key); retry in {seconds_left} s",
                           headers={"Retry-After": str(seconds_left)})
    try:
        created = services.store.create(job, owner=owner, idempotency_key=idempotency_key, token_cost=token_cost)
    except IdempotencyConflict as exc:
        services.metrics.job_rejected("idempotency_conflict")
        raise ApiError(422, "idempotency_conflict", f"Idempotency-Key: {exc} (job {exc.existing_job_id})",
                       field="Idempotency-Key") from exc
    except QueueFull as exc:
        services.metrics.job_rejected("queue_full")
        raise ApiError(429, "queue_full", f"{exc}; retry after {settings.retry_after_seconds} s",
                       headers=retry_after) from exc
    except KeyLimitExceeded as exc:
        services.metrics.job_rejected("key_limit")
        seconds = exc.retry_after or settings.retry_after_seconds
        raise ApiError(429, KEY_LIMIT_CODES[exc.limit], f"{exc}; retry in {seconds} s",
                       headers={"Retry-After": str(seconds)}) from exc
    if created.created:
        try:
            services.queue.submit(created.job_id)
        except Exception as exc:  # broker errors come in many types; the job must not stay queued forever
            logger.exception("could not enqueue job %s", created.job_id)
            services.store.fail(created.job_id, "enqueue_failed", "the job could not be handed to the queue")
            services.metrics.job_rejected("enqueue_failed")
            raise ApiError(503, "enqueue_failed", "the job queue is unavailable; retry later",
                           headers=retry_after) from exc
        services.metrics.job_submitted(job.kind)
    confirm_replicated(services)  # a replay too: the earlier attempt may not have been confirmed
    # A new job's record is known without a read (one Redis round trip less per submission).
    record = created.record or services.store.get(created.job_id)
    if record is None:
        raise ApiError(503, "unavailable", "the job record vanished right after creation; retry")
    return record, created.created


def confirm_replicated(services: AppServices) -> None:
    """No acknowledgement without replication (`redis_min_replicas_ack`): 503 with Retry-After when the
    replicas do not confirm the job in time. The job may exist and run anyway (it was written, only not
    confirmed), so the message tells the client to resubmit with the same Idempotency-Key."""
    try:
        services.store.confirm_replicated()
    except ReplicationTimeout as exc:
        services.metrics.job_rejected("not_replicated")
        raise ApiError(503, "not_replicated", f"{exc}. The job may still run: resubmit with the same "
                       "Idempotency-Key to get that job rather than a second one",
                       headers={"Retry-After": str(services.settings.retry_after_seconds)}) from exc
