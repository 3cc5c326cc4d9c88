"""The Python client (sync and async) against the API over real HTTP; job progress is written through the
real JobStore, as a worker would."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.client import AsyncDgserveClient, DgserveClient, DgserveError
from tests.services.api_keys import KEY_A


def finish_later(api, job_id: str, delay: float = 0.3) -> threading.Thread:
    def run():
        time.sleep(delay)
        api.store.try_start(job_id, "w")
        api.store.append_event(job_id, "draft", {"canvas": 0, "step": 1, "text": "dra"})
        api.store.append_event(job_id, "canvas", {"canvas": 0, "text": "draft"})
        api.store.succeed(job_id, {"text": "draft", "finish_reason": "stop"})

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sync_client_submit_events_wait_and_errors(start_api):
    api = start_api(api_keys=KEY_A)
    with DgserveClient(api.url, api_key=KEY_A) as client:
        accepted = client.generate("hello", max_new_tokens=8, seed=1, stream_drafts=True)
        assert accepted.status == "queued" and client.get(accepted.id).kind == "generate"
        worker = finish_later(api, accepted.id)
        events = list(client.events(accepted.id))
        worker.join(timeout=10)
        assert [e.event for e in events] == ["queued", "started", "draft", "canvas", "done"]
        assert events[-1].is_terminal and events[-1].data["result"]["text"] == "draft"
        assert [e.event for e in client.events(accepted.id, last_event_id=events[2].id)] == ["canvas", "done"]
        done = client.wait(accepted.id, timeout=5)
        assert done.status == "succeeded" and done.result["text"] == "draft"
        with pytest.raises(DgserveError) as invalid:
            client.edit("abc", [{"start": 2, "end": 9}])
        assert invalid.value.status == 422 and invalid.value.field == "edits[0]"
        with pytest.raises(DgserveError) as missing:
            client.get("does-not-exist")
        assert missing.value.status == 404 and missing.value.code == "not_found"
    with DgserveClient(api.url) as anonymous, pytest.raises(DgserveError) as unauthorized:
        anonymous.get(accepted.id)
    assert unauthorized.value.status == 401


def test_sync_client_cancel_and_wait_timeout(start_api):
    api = start_api()
    with DgserveClient(api.url) as client:
        job = client.edit("one two three", [{"find": "two", "instruction": "a number"}], seed=3)
        with pytest.raises(TimeoutError):
            client.wait(job.id, timeout=0.3, poll_interval=0.05)
        assert client.cancel(job.id).status == "cancelled"
        with pytest.raises(DgserveError) as finished:
            client.cancel(job.id)
        assert finished.value.status == 409
        assert client.wait(job.id, timeout=1).status == "cancelled"


def test_sync_client_surfaces_retry_after(start_api):
    api = start_api(max_queued_jobs=1, retry_after_seconds=3)
    with DgserveClient(api.url) as client:
        client.generate("a")
        with pytest.raises(DgserveError) as full:
            client.generate("b")
    assert full.value.status == 429 and full.value.retry_after == 3.0


def test_async_client(start_api):
    api = start_api()

    async def scenario():
        async with AsyncDgserveClient(api.url) as client:
            accepted = await client.generate(messages=[{"role": "user", "content": "hi"}], idempotency_key="k1")
            again = await client.generate(messages=[{"role": "user", "content": "hi"}], idempotency_key="k1")
            assert again.id == accepted.id
            worker = finish_later(api, accepted.id, delay=0.2)
            events = [event.event async for event in client.events(accepted.id)]
            worker.join(timeout=10)
            done = await client.wait(accepted.id, timeout=5)
            cancelled = await client.cancel((await client.edit("xy", [{"start": 0, "end": 1}])).id)
            with pytest.raises(DgserveError) as error:
                await client.get("nope")
            return events, done, cancelled, error.value

    events, done, cancelled, error = asyncio.run(scenario())
    assert events == ["queued", "started", "draft", "canvas", "done"]
    assert done.status == "succeeded" and cancelled.status == "cancelled" and error.status == 404
