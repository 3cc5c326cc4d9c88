"""Batches in Redis, and how their state follows their jobs.

Keys: `dgserve:batch:{id}` hash (owner, endpoint, status, times, counts, output/error file ids),
`dgserve:batch:{id}:lines` list of `LineEntry` JSON in input order, `dgserve:batches:{owner}` sorted set
(score = created_at) for listing. TTLs follow the jobs': completion window + result TTL while the batch
runs, result TTL once it is finished.

A batch has no process of its own: `refresh` (called by every read) counts its jobs' statuses, expires
what is left once the completion window has passed, and when every job is finished writes the output file
(one line per request that succeeded, keyed by `custom_id`) and the error file (lines refused at
submission, failed, cancelled or expired), exactly once (`HSETNX finalizing`). Partial results therefore
survive cancel and expiry: the finished lines are in the output file.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

from services.api.deps import AppServices
from services.api.errors import ApiError
from services.openai.batch_lines import LineEntry, plan_line
from services.openai.errors import openai_error
from services.openai.files import FileStore
from services.openai.shapes import ResponseShape

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})
_UNRUN = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
          "expired": ("batch_expired", "the batch's completion window ended before this request ran")}
_TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
               "cancelled_at")


class BatchStore:
    def __init__(self, services: AppServices, files: FileStore):
        self.services, self.files = services, files
        self.redis = services.store.redis

    @staticmethod
    def key(batch_id: str) -> str:
        return f"dgserve:batch:{batch_id}"

    @staticmethod
    def lines_key(batch_id: str) -> str:
        return f"dgserve:batch:{batch_id}:lines"

    @staticmethod
    def owner_key(owner: str) -> str:
        return f"dgserve:batches:{owner or '-'}"

    def new_id(self) -> str:
        return f"batch_{uuid.uuid4().hex}"

    def create(self, batch_id: str, owner: str, fields: dict[str, Any], entries: list[LineEntry],
               window_seconds: int) -> dict[str, str]:
        now = int(time.time())
        ttl = window_seconds + self.services.settings.result_ttl_seconds
        record = {**{k: str(v) for k, v in fields.items()}, "id": batch_id, "owner": owner, "status": "in_progress",
                  "created_at": str(now), "in_progress_at": str(now), "expires_at": str(now + window_seconds),
                  "total": str(len(entries)), "completed": "0",
                  "failed": str(sum(entry.error is not None for entry in entries))}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.key(batch_id), mapping=cast(Any, record))
        if entries:
            pipe.rpush(self.lines_key(batch_id), *[entry.to_json() for entry in entries])
        pipe.zadd(self.owner_key(owner), {batch_id: now})
        for key in (self.key(batch_id), self.lines_key(batch_id), self.owner_key(owner)):
            pipe.expire(key, ttl)
        pipe.execute()
        return record

    def get(self, batch_id: str, owner: str) -> dict[str, str] | None:
        raw = cast(dict[str, str], self.redis.hgetall(self.key(batch_id))) if len(batch_id) <= 80 else {}
        return raw if raw and raw.get("owner") == owner else None

    def list_for(self, owner: str, limit: int, after: str | None) -> list[dict[str, str]]:
        """The owner's batches, newest first, after the id `after` (cursor pagination)."""
        ids = cast(list[str], self.redis.zrevrange(self.owner_key(owner), 0, -1))
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        records = [self.get(batch_id, owner) for batch_id in ids[:limit]]
        return [self.refresh(record) for record in records if record is not None]

    def entries(self, batch_id: str) -> list[LineEntry]:
        return [LineEntry.from_json(raw) for raw in cast(list[str], self.redis.lrange(self.lines_key(batch_id), 0, -1))]

    def _job_states(self, job_ids: list[str]) -> dict[str, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(f"job:{job_id}", "status")
        return dict(zip(job_ids, pipe.execute(), strict=True))

    def cancel(self, record: dict[str, str]) -> dict[str, str]:
        """Ask every unfinished job of the batch to stop (queued ones at once); 409 once finished."""
        if record["status"] in FINAL_STATUSES:
            raise ApiError(409, "batch_finished", f"batch {record['id']} already finished ({record['status']})")
        now = str(int(time.time()))
        self.redis.hset(self.key(record["id"]), mapping={"status": "cancelling", "cancelling_at": now})
        for entry in self.entries(record["id"]):
            for job_id in entry.job_ids:
                self.services.store.cancel(job_id)
        return self.refresh({**record, "status": "cancelling", "cancelling_at": now})

    def refresh(self, record: dict[str, str]) -> dict[str, str]:
        """Counts from the jobs; expiry past the window; the output files once every job is finished."""
        if record["status"] in FINAL_STATUSES:
            return record
        entries = self.entries(record["id"])
        job_ids = [job_id for entry in entries for job_id in entry.job_ids]
        states = self._job_states(job_ids)
        expiring = time.time() > float(record["expires_at"])
        if expiring:
            for job_id, status in states.items():
                if status in ("queued", "running"):
                    self.services.store.expire(job_id, "the batch's completion window ended")
            states = self._job_states(job_ids)
        done = [all(states[j] not in ("queued", "running") for j in e.job_ids) for e in entries]
        succeeded = sum(1 for entry, finished in zip(entries, done, strict=True) if finished and entry.job_ids
                        and all(states[j] == "succeeded" for j in entry.job_ids))
        failed = sum(done) - succeeded
        self.redis.hset(self.key(record["id"]), mapping={"completed": succeeded, "failed": failed})
        record = {**record, "completed": str(succeeded), "failed": str(failed)}
        if all(done) and self.redis.hsetnx(self.key(record["id"]), "finalizing_at", str(int(time.time()))):
            end = "cancelled" if record["status"] == "cancelling" else "expired" if expiring else "completed"
            return self._finalize(record, entries, end)
        return record

    def _finalize(self, record: dict[str, str], entries: list[LineEntry], end: str) -> dict[str, str]:
        outputs: list[str] = []
        errors: list[str] = []
        for entry in entries:
            target, line = self._output_line(record["endpoint"], entry)
            (outputs if target == "output" else errors).append(json.dumps(line))
        now, owner = int(time.time()), record["owner"]
        update = {"status": end, f"{end}_at": str(now)}
        for name, lines in (("output_file_id", outputs), ("error_file_id", errors)):
            if lines:
                stored = self.files.create(owner, "batch_output", f"{record['id']}_{name[:-8]}.jsonl",
                                           "\n".join(lines) + "\n")
                update[name] = stored.id
        ttl = self.services.settings.result_ttl_seconds
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.key(record["id"]), mapping=cast(Any, update))
        pipe.expire(self.key(record["id"]), ttl)
        pipe.expire(self.lines_key(record["id"]), ttl)
        pipe.execute()
        return {**record, **update}

    def _output_line(self, endpoint_path: str, entry: LineEntry) -> tuple[str, dict[str, Any]]:
        """('output' | 'error', the line) of one request, OpenAI's batch output format."""
        line: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": entry.custom_id,
                                "response": None, "error": None}
        if entry.error is not None:
            return "error", {**line, "response": {"status_code": entry.error["status_code"], "request_id": None,
                                                  "body": entry.error["body"]}}
        records = [self.services.store.get(job_id) for job_id in entry.job_ids]
        request_id = entry.job_ids[0]
        for record in records:
            if record is None or record.status in _UNRUN:
                code, message = _UNRUN.get(record.status if record else "expired", _UNRUN["expired"])
                return "error", {**line, "error": {"code": code, "message": message}}
            if record.status != "succeeded":
                code, message = record.error or ("job_failed", "the job failed")
                body = openai_error(500, message, code=code)
                return "error", {**line, "response": {"status_code": 500, "request_id": record.id, "body": body}}
        plan = plan_line(self.services, endpoint_path, entry.body or {})
        shape = ResponseShape(plan, f"batch-{request_id}", int(records[0].created_at) if records[0] else 0,
                              self.services.settings.model_name)
        body = shape.complete([record.result or {} for record in records if record is not None])
        return "output", {**line, "response": {"status_code": 200, "request_id": request_id, "body": body}}


def batch_public(record: dict[str, str]) -> dict[str, Any]:
    """OpenAI's `batch` object."""
    def stamp(name: str) -> int | None:
        return int(record[name]) if record.get(name) else None

    total, completed, failed = (int(record.get(name, 0)) for name in ("total", "completed", "failed"))
    return {
        "id": record["id"], "object": "batch", "endpoint": record["endpoint"], "errors": None,
        "input_file_id": record["input_file_id"], "completion_window": record["completion_window"],
        "status": record["status"], "output_file_id": record.get("output_file_id"),
        "error_file_id": record.get("error_file_id"), "created_at": int(record["created_at"]),
        "expires_at": stamp("expires_at"), **{name: stamp(name) for name in _TIMESTAMPS},
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": json.loads(record.get("metadata") or "null"),
    }
