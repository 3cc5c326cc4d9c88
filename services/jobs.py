"""Redis job store: the record of every job, its event stream, admission and worker heartbeats.

Keys (one Redis database per deployment):
- `job:{id}` hash: status, owner (API key hash), payload (the validated request as JSON; never in the
  Celery message), timings, attempts, progress, result, error, cancel flag. TTL: deadline + result TTL
  while pending, result TTL once finished.
- `job:{id}:events` stream: entries `{type, data(JSON)}`; types queued, started, draft, canvas, done,
  failed, cancelled, expired. Same TTL as the record.
- `dgserve:queued:{queue}` sorted set (score = created_at): queued jobs of a model queue; its size is the
  queue depth used for admission. Entries older than the job deadline are pruned, so it cannot drift.
- `dgserve:running:{queue}` sorted set (score = lease expiry): running jobs of a model queue, kept in step
  with the record by the same scripts (start, lease renewal, requeue, every terminal write). Workers scan
  it for orphans: running jobs whose lease lapsed because their worker stopped renewing it.
- `dgserve:idem:{owner}:{sha256(key)}` → `"{job_id}|{body_hash}"`.
- `dgserve:workers` sorted set (score = last heartbeat) and `dgserve:worker_info` hash.
- `dgserve:rate:{owner}:{minute}` counters of the optional per-key submission rate limit.
- `dgserve:fair:{queue}:{lane}:*` per-key lanes of queued jobs, `dgserve:active:{owner}` (a key's unfinished
  jobs) and `dgserve:tpm:{owner}:{minute}` (its tokens this minute): services/fair_scripts.py.
- `dgserve:replication_fence` counter: the write each WAIT for replicas waits behind (services.replication).

Status changes are compare-and-set Lua scripts (`services.job_scripts`): queued → running →
succeeded | failed | cancelled | expired, queued → cancelled | failed | expired, and running → queued
when an orphan is reclaimed or its worker releases it (event `requeued`). A finished job is never
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

from services import fair_scripts, job_scripts
from services.job_record import JobRecord, decode_record
from services.key_limits import parse_key_limits
from services.redis_options import sync_redis_client
from services.replication import confirm_replicated
from services.schemas import EditJobCreate, GenerateJobCreate
from services.settings import Settings

WORKERS_KEY = "dgserve:workers"
_JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
WORKER_INFO_KEY = "dgserve:worker_info"
START_NEXT_MAX_POPS = 100  # lane entries one START_NEXT call may pop (skipping finished jobs) before it answers
LIVENESS_BEATS = 3  # a worker record counts as alive for this many of its beat intervals (worker/heartbeat.py)
StartOutcome = Literal[
    "started", "restarted", "not_found", "already_finished", "running_elsewhere", "expired", "attempts_exhausted"
]


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was already used with a different request body."""

    def __init__(self, existing_job_id: str):
        super().__init__("this Idempotency-Key was already used with a different request body")
        self.existing_job_id = existing_job_id


class QueueFull(RuntimeError):
    """The model queue is at its admission limit; retry later."""


class KeyLimitExceeded(RuntimeError):
    """The API key is at one of its own limits (`limit`: `max_queued_jobs` or `tokens_per_minute`); nothing
    was created. `retry_after` is None when the store cannot know (a queued job must finish first)."""

    def __init__(self, limit: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.limit, self.retry_after = limit, retry_after


@dataclass(frozen=True)
class CreateOutcome:
    job_id: str
    created: bool  # False: an idempotent replay of an earlier identical request
    record: JobRecord | None = None  # the new job's record as written (None for a replay: read it)


@dataclass(frozen=True)
class StartDecision:
    """What `try_start` decided. Run the job only when `should_run`."""

    outcome: StartOutcome
    attempts: int
    job: JobRecord | None

    @property
    def should_run(self) -> bool:
        return self.outcome in ("started", "restarted")


def is_job_id(text: str) -> bool:
    """Whether `text` has the shape of the ids `JobStore.create` makes (32 lowercase hex digits)."""
    return _JOB_ID.fullmatch(text) is not None


def request_fingerprint(request: GenerateJobCreate | EditJobCreate) -> str:
    """sha256 of the request's canonical JSON: equal for semantically identical bodies."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JobStore:
    """All job state in Redis. Takes a `redis.Redis` created with `decode_responses=True`."""

    def __init__(self, redis_client: redis.Redis, settings: Settings):
        self.redis = redis_client
        self.settings = settings
        self._create = redis_client.register_script(job_scripts.CREATE)
        self._try_start = redis_client.register_script(job_scripts.TRY_START)
        self._finish = redis_client.register_script(job_scripts.FINISH)
        self._renew_lease = redis_client.register_script(job_scripts.RENEW_LEASE)
        self._reclaim = redis_client.register_script(job_scripts.RECLAIM)
        self._release = redis_client.register_script(job_scripts.RELEASE)
        self._append_event = redis_client.register_script(job_scripts.APPEND_EVENT)
        self._request_cancel = redis_client.register_script(job_scripts.REQUEST_CANCEL)
        self._start_next = redis_client.register_script(job_scripts.START_NEXT)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        return cls(sync_redis_client(settings, health_check_interval=30), settings)

    def confirm_replicated(self) -> None:
        """Return once `settings.replicas_to_ack` replicas hold every write answered so far (a no-op when 0);
        `services.replication.ReplicationTimeout` (a ConnectionError) otherwise. Called before a 202 and
        after every terminal write."""
        confirm_replicated(self.redis, self.settings.replicas_to_ack, self.settings.replica_ack_timeout_ms)

    # ---- key names (shared with the SSE reader) -------------------------------------------------
    @staticmethod
    def job_key(job_id: str) -> str:
        return f"job:{job_id}"

    @staticmethod
    def events_key(job_id: str) -> str:
        return f"job:{job_id}:events"

    @property
    def queued_key(self) -> str:
        return f"dgserve:queued:{self.settings.queue_name}"

    @property
    def running_key(self) -> str:
        return f"dgserve:running:{self.settings.queue_name}"

    def _keys(self, job_id: str) -> list[str]:
        return [self.job_key(job_id), self.events_key(job_id), self.queued_key]

    def lane_prefix(self, batch: bool = False) -> str:
        """Key prefix of this queue's interactive or batch lane (services/fair_scripts.py)."""
        return fair_scripts.lane_prefix(self.settings.queue_name, "batch" if batch else "interactive")

    def _status_keys(self, job_id: str) -> list[str]:
        """KEYS of the status-changing scripts: job, events, queued set, running set."""
        return [*self._keys(job_id), self.running_key]

    # ---- API side --------------------------------------------------------------------------------
    def create(self, request: GenerateJobCreate | EditJobCreate, owner: str = "",
               idempotency_key: str | None = None, batch_id: str | None = None,
               deadline_seconds: float | None = None, token_cost: int = 0) -> CreateOutcome:
        """Store a new queued job, or return the earlier job of the same Idempotency-Key and body.

        Raises `IdempotencyConflict` (same key, different body), `QueueFull` (admission limit) or
        `KeyLimitExceeded` (the owner's `key_limits`: unfinished jobs, or `token_cost` more tokens this minute).
        Nothing is created in any case. A batch line (`batch_id`) was admitted with its batch: it skips
        the queued-jobs and per-key limits and stays out of the queued set (interactive queue depth), and runs
        under `deadline_seconds` (the batch's completion window) instead of `job_deadline_seconds`. The job
        joins its owner's list in the interactive or batch lane, from which workers pick fairly (`start_next`).
        """
        settings, now = self.settings, time.time()
        deadline = settings.job_deadline_seconds if deadline_seconds is None else deadline_seconds
        job_id = uuid.uuid4().hex
        body_hash = request_fingerprint(request)
        idem_key = ""
        if idempotency_key is not None:
            key_digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()
            idem_key = f"dgserve:idem:{owner or '-'}:{key_digest}"
        record_ttl = int(deadline) + settings.result_ttl_seconds
        fields = {
            "id": job_id, "kind": request.kind, "status": "queued", "owner": owner,
            "payload": request.model_dump_json(), "queue": settings.queue_name, "attempts": "0",
            "created_at": repr(now), "deadline_at": repr(now + deadline),
            "expires_at": repr(now + record_ttl), "cancel_requested": "0",
        }
        if batch_id is not None:
            fields["batch_id"] = batch_id
        limits = parse_key_limits(settings.key_limits).for_owner(owner)
        owner_tag, minute = fair_scripts.owner_tag(owner), int(now) // 60
        lane = self.lane_prefix(batch=batch_id is not None)
        args: list[Any] = [job_id, repr(now), record_ttl, repr(now - settings.job_deadline_seconds),
                           0 if batch_id is not None else settings.max_queued_jobs, f"{job_id}|{body_hash}",
                           settings.events_max_len, json.dumps({"status": "queued"}), owner_tag,
                           limits.max_queued_jobs or 0, limits.tokens_per_minute or 0, token_cost,
                           repr(now + deadline)]
        for name, value in fields.items():
            args += [name, value]
        keys = [*self._keys(job_id), idem_key, fair_scripts.active_key(owner), f"dgserve:tpm:{owner_tag}:{minute}",
                f"{lane}key:{owner_tag}", f"{lane}ring", f"{lane}turn"]
        outcome, existing = self._create(keys=keys, args=args)
        if outcome == "conflict":
            raise IdempotencyConflict(existing)
        if outcome == "full":
            raise QueueFull(f"queue {settings.queue_name} holds {settings.max_queued_jobs} jobs")
        if outcome == "key_queued":
            raise KeyLimitExceeded("max_queued_jobs", f"this key has {limits.max_queued_jobs} unfinished jobs "
                                   f"(its max_queued_jobs limit, key_limits queued:N)")
        if outcome == "key_tpm":
            raise KeyLimitExceeded("tokens_per_minute", f"this key submitted {existing} tokens this minute; "
                                   f"{token_cost} more would pass its limit of {limits.tokens_per_minute} "
                                   f"(key_limits tpm:N)", retry_after=60 - int(now) % 60)
        if outcome == "replay" and not self.redis.exists(self.job_key(existing)):
            # The earlier job's record expired before its idempotency key: the key is free again.
            self.redis.delete(idem_key)
            return self.create(request, owner, idempotency_key, batch_id, deadline_seconds, token_cost)
        if outcome == "created":
            return CreateOutcome(job_id=job_id, created=True, record=decode_record(job_id, fields, request))
        return CreateOutcome(job_id=existing, created=False)

    def get_for_owner(self, job_id: str, owner: str) -> JobRecord | None:
        """The job if it exists and belongs to `owner` (others' jobs look missing)."""
        record = self.get(job_id)
        return record if record is not None and record.owner == owner else None

    def cancel(self, job_id: str) -> str:
        """Cancel a job: queued → cancelled now; running → cancel flag for the worker.

        Returns `cancelled`, `cancel_requested`, `finished` or `not_found`.
        """
        if self._finish_job(job_id, ("queued",), "cancelled", "cancelled", {}, {}):
            return "cancelled"
        status = self._request_cancel(keys=[self.job_key(job_id)])
        if status == "running":
            return "cancel_requested"
        if status == "queued":  # started and stopped between the two scripts: try again
            return self.cancel(job_id)
        return "finished" if status else "not_found"

    def count_submission(self, owner: str, window_seconds: int = 60) -> tuple[int, int]:
        """Count one submission of `owner` in the current fixed window; returns (count so far, seconds left)."""
        window = int(time.time()) // window_seconds
        key = f"dgserve:rate:{owner or '-'}:{window}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, window_seconds + 1)
        count, _ = pipe.execute()
        return int(count), window_seconds - int(time.time()) % window_seconds

    def queue_depth(self) -> int:
        """Queued jobs of this model queue (stale entries older than the deadline pruned)."""
        stale_before = time.time() - self.settings.job_deadline_seconds
        self.redis.zremrangebyscore(self.queued_key, "-inf", stale_before)
        return int(self.redis.zcard(self.queued_key))

    # ---- worker side (docs/architecture.md) -------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        raw = cast(dict[str, str], self.redis.hgetall(self.job_key(job_id)))
        return decode_record(job_id, raw) if raw else None

    def try_start(self, job_id: str, worker_id: str) -> StartDecision:
        """Compare-and-set queued → running and count the attempt.

        A `running` job is taken over (`restarted`) only when its lease has lapsed or this worker held
        it: a redelivered message means its previous worker is gone. Finished jobs are refused; a job
        past its deadline becomes `expired`, one out of attempts becomes `failed`.
        """
        now = time.time()
        lease_until = now + self.settings.job_lease_seconds
        # One round trip for the decision and the record it leaves (this is on every job's start path);
        # MULTI/EXEC, so the record read is the state the script just wrote.
        pipe = self.redis.pipeline(transaction=True)
        self._try_start(keys=self._status_keys(job_id), args=[
            job_id, repr(now), worker_id, self.settings.max_attempts, repr(lease_until),
            self.settings.result_ttl_seconds, self.settings.events_max_len], client=pipe)
        pipe.hgetall(self.job_key(job_id))
        (outcome, attempts, _), raw = pipe.execute()
        job = decode_record(job_id, raw) if raw else None
        return StartDecision(outcome=outcome, attempts=int(attempts), job=job)

    def start_next(self, worker_id: str, batch: bool = False, exclude: Iterable[str] = ()) -> StartDecision | None:
        """Start the next queued job of this queue, taking API keys in turn (the fair pick): from the lane of
        the message's class first (`batch`: the batch lane), then the other lane. None when neither holds a
        startable job. Atomic like `try_start` (a job is started once, under a lease of `worker_id`); jobs
        past their deadline or out of attempts met on the way are finished as `try_start` would. Jobs in
        `exclude` (the caller's attempts still in flight: requeued while it looked dead) are left queued."""
        now = time.time()
        lanes = [self.lane_prefix(batch), self.lane_prefix(not batch)]
        keys = [self.queued_key, self.running_key]
        for lane in lanes:
            keys += [f"{lane}ring", f"{lane}turn"]
        args: list[Any] = [repr(now), worker_id, self.settings.max_attempts,
                           repr(now + self.settings.job_lease_seconds), self.settings.result_ttl_seconds,
                           self.settings.events_max_len, START_NEXT_MAX_POPS, json.dumps(sorted(exclude)), *lanes]
        while True:  # each 'busy' answer skipped START_NEXT_MAX_POPS dead entries, so this ends
            reply = self._start_next(keys=keys, args=args)
            if reply[0] == "started":
                _, job_id, attempts, flat = reply
                raw = dict(zip(flat[::2], flat[1::2], strict=True))
                return StartDecision(outcome="started", attempts=int(attempts), job=decode_record(job_id, raw))
            if reply[0] == "empty":
                return None

    def append_event(self, job_id: str, type: str, data: dict[str, Any]) -> str | None:
        """Append `{type, data}` to the job's stream; returns the entry id (None if the job is gone)."""
        return self._append_event_script(job_id, type, data)

    def set_progress(self, job_id: str, canvas: int, step: int, worker_id: str | None = None) -> bool:
        """Record progress of a running job and renew the lease on it for `job_lease_seconds`.

        With `worker_id`, only while that worker holds the job (False once it was requeued or taken over).
        """
        return bool(self._renew_lease_script(job_id, canvas, step, worker_id))

    def append_event_with_progress(self, job_id: str, type: str, data: dict[str, Any], canvas: int, step: int,
                                   worker_id: str | None = None) -> bool:
        """`append_event` then `set_progress` in one round trip (the worker's per-step write: one RTT less
        per step on the writer thread, which the job's terminal write queues behind). Returns what
        `set_progress` returns."""
        pipe = self.redis.pipeline(transaction=False)
        self._append_event_script(job_id, type, data, client=pipe)
        self._renew_lease_script(job_id, canvas, step, worker_id, client=pipe)
        _, renewed = pipe.execute()
        return bool(renewed)

    def _append_event_script(self, job_id: str, type: str, data: dict[str, Any], client: redis.client.Pipeline | None = None) -> Any:
        return self._append_event(keys=[self.job_key(job_id), self.events_key(job_id)],
                                  args=[type, json.dumps(data), self.settings.events_max_len], client=client)

    def _renew_lease_script(self, job_id: str, canvas: int, step: int, worker_id: str | None,
                            client: redis.client.Pipeline | None = None) -> Any:
        lease_until = repr(time.time() + self.settings.job_lease_seconds)
        return self._renew_lease(keys=[self.job_key(job_id), self.running_key], args=[
            job_id, lease_until, worker_id or "", "progress_canvas", canvas, "progress_step", step], client=client)

    def reclaim_orphans(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Requeue running jobs of this queue whose lease lapsed before `now`; returns the requeued ids.

        Each job is a compare-and-set on the lapsed lease (a holder that renewed meanwhile keeps it), so
        concurrent reclaimers requeue a job once: only the caller that gets an id back must re-send its
        `dgserve.run_job` message. Orphans past their deadline become `expired`, those out of attempts
        `failed` (not returned). A requeued job gets a `requeued` event `{reason, attempts, worker_id}`.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        now = time.time() if now is None else now
        lapsed = cast(list[str], self.redis.zrangebyscore(self.running_key, "-inf", now, start=0, num=limit))
        requeued = []
        for job_id in lapsed:
            outcome = self._reclaim(keys=self._status_keys(job_id), args=[
                job_id, repr(now), self.settings.max_attempts, self.settings.result_ttl_seconds,
                self.settings.events_max_len, "lease_expired", self.lane_prefix()])
            if outcome == "requeued":
                requeued.append(job_id)
        return requeued

    def release(self, job_id: str, worker_id: str, reason: str = "released") -> bool:
        """running → queued at once, only while `worker_id` holds the job (the holder hands it back, e.g. at
        shutdown); emits `requeued`. The attempt stays counted. False when refused."""
        return bool(self._release(keys=self._status_keys(job_id),
                                  args=[job_id, worker_id, self.settings.events_max_len, reason,
                                        self.lane_prefix()]))

    def succeed(self, job_id: str, result: dict[str, Any]) -> bool:
        """running → succeeded with `result`; emits `done`. False if the job was not running."""
        payload = json.dumps(result)
        return self._finish_job(job_id, ("running",), "succeeded", "done", {"result": result},
                                {"result": payload})

    def fail(self, job_id: str, code: str, message: str) -> bool:
        """queued|running → failed; emits `failed`. False if the job had already finished."""
        error = {"code": code, "message": message}
        return self._finish_job(job_id, ("queued", "running"), "failed", "failed", {"error": error},
                                {"error_code": code, "error_message": message})

    def expire(self, job_id: str, message: str = "the job was not finished before its deadline") -> bool:
        """queued|running → expired (deadline passed); emits `expired`."""
        error = {"code": "deadline_exceeded", "message": message}
        return self._finish_job(job_id, ("queued", "running"), "expired", "expired", {"error": error},
                                {"error_code": "deadline_exceeded", "error_message": message})

    def is_cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.job_key(job_id), "cancel_requested") == "1"

    def mark_cancelled(self, job_id: str) -> bool:
        """queued|running → cancelled (the worker honoured the cancel flag); emits `cancelled`."""
        return self._finish_job(job_id, ("queued", "running"), "cancelled", "cancelled", {}, {})

    def _finish_job(self, job_id: str, allowed: tuple[str, ...], new_status: str, event_type: str,
                    event_data: dict[str, Any], fields: dict[str, str]) -> bool:
        args: list[Any] = [job_id, repr(time.time()), "".join(f"{s}," for s in allowed), new_status,
                           self.settings.result_ttl_seconds, self.settings.events_max_len, event_type,
                           json.dumps(event_data)]
        for name, value in fields.items():
            args += [name, value]
        outcome, _ = self._finish(keys=self._status_keys(job_id), args=args)
        self.confirm_replicated()  # also after a refused repeat: the earlier commit must be on a replica too
        return outcome == "ok"

    # ---- worker heartbeats ------------------------------------------------------------------------
    def heartbeat(self, worker_id: str, info: dict[str, Any]) -> None:
        """Register `worker_id` as alive now, with a small JSON-able `info` (model, gpu, queue, `beat_interval_s`,
        ...), stamped with the Redis server's `run_id` (see `live_workers`)."""
        run_id = cast(dict[str, Any], self.redis.info("server"))["run_id"]
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(WORKERS_KEY, {worker_id: time.time()})
        pipe.hset(WORKER_INFO_KEY, worker_id, json.dumps({**info, "redis_run_id": run_id}))
        pipe.execute()

    def forget_worker(self, worker_id: str) -> None:
        """Remove a worker's record (it shut down cleanly)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(WORKERS_KEY, worker_id)
        pipe.hdel(WORKER_INFO_KEY, worker_id)
        pipe.execute()

    def live_workers(self) -> list[dict[str, Any]]:
        """Workers alive now: records written to the Redis server running now (same `redis_run_id`: not from
        before a restart, not a dead worker's restored from the AOF), within `job_lease_seconds` and, when
        the record gives its `beat_interval_s`, within `LIVENESS_BEATS` of those intervals. Records older than
        `job_lease_seconds` are dropped. The worker side of the format: worker/heartbeat.py."""
        now = time.time()
        stale_before = now - self.settings.job_lease_seconds
        stale = self.redis.zrangebyscore(WORKERS_KEY, "-inf", stale_before)
        if stale:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(WORKERS_KEY, *stale)
            pipe.hdel(WORKER_INFO_KEY, *stale)
            pipe.execute()
        run_id = cast(dict[str, Any], self.redis.info("server"))["run_id"]
        live = cast(list[tuple[str, float]],
                    self.redis.zrangebyscore(WORKERS_KEY, stale_before, "+inf", withscores=True))
        infos = self.redis.hmget(WORKER_INFO_KEY, [worker for worker, _ in live]) if live else []
        workers = [{"worker_id": worker, "last_seen": seen, **json.loads(info or "{}")}
                   for (worker, seen), info in zip(live, infos, strict=True)]
        return [worker for worker in workers if worker.get("redis_run_id") == run_id and (
                "beat_interval_s" not in worker
                or now - worker["last_seen"] <= LIVENESS_BEATS * float(worker["beat_interval_s"]))]
