"""Server-Sent Events from a job's Redis stream (`job:{id}:events`), resumable by stream id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from services.jobs import JobStore
from services.schemas import TERMINAL_STATUSES

# Event types after which a job's stream gets nothing more.
TERMINAL_EVENTS = frozenset({"done", "failed", "cancelled", "expired"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
_BATCH = 256


def format_event(entry_id: str, event_type: str, data: str) -> str:
    """One SSE frame; `data` is JSON (no newlines: json.dumps never emits them)."""
    return f"id: {entry_id}\nevent: {event_type}\ndata: {data}\n\n"


async def job_event_stream(client: aioredis.Redis, job_id: str, after_id: str,
                           keepalive_seconds: float) -> AsyncIterator[str]:
    """Yield SSE frames for entries after `after_id` until a terminal event, or until the job is finished
    (or gone) with nothing left to read. A comment line every `keepalive_seconds` keeps proxies from
    closing an idle connection; the client's disconnect cancels this generator."""
    events_key, job_key = JobStore.events_key(job_id), JobStore.job_key(job_id)
    yield "retry: 1000\n\n"
    block_ms: int | None = None  # first read does not block: a finished job's replay ends at once
    finished = False
    while True:
        batches: Any = await client.xread({events_key: after_id}, count=_BATCH, block=block_ms)
        block_ms = int(keepalive_seconds * 1000)
        entries: list[tuple[str, dict[str, str]]] = batches[0][1] if batches else []
        for entry_id, fields in entries:
            event_type = fields.get("type", "message")
            yield format_event(entry_id, event_type, fields.get("data", "{}"))
            after_id = entry_id
            if event_type in TERMINAL_EVENTS:
                return
        if batches:
            continue
        if finished:  # one more read after seeing the job finished drained anything written meanwhile
            return
        status = await client.hget(job_key, "status")
        if status is None or status in TERMINAL_STATUSES:
            finished, block_ms = True, None
            continue
        yield ": keep-alive\n\n"
