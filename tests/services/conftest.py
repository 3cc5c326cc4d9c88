"""Fixtures of the services tests: a model folder with a real tokenizer, and API servers over real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from dgtext.byte_tokenizer import build_byte_tokenizer
from dgtext.save_tokenizer import save_tokenizer_files
from services.api.app import create_app
from services.jobs import JobStore
from services.settings import Settings
from tests.support.api_server import serve_in_thread


@pytest.fixture(scope="session")
def tokenizer_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder named like a model with only tokenizer files: all the API needs (the byte tokenizer
    makes token counts predictable: one token per UTF-8 byte, plus bos)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-api"
    save_tokenizer_files(build_byte_tokenizer(512), folder)
    return folder


@dataclass
class RunningApi:
    url: str
    settings: Settings
    store: JobStore
    redis: redis.Redis
    http: httpx.Client

    def queue_length(self) -> int:
        """Celery messages waiting in the model queue (a Redis list named like the queue)."""
        return int(self.redis.llen(self.settings.queue_name))

    def run_next_job(self, events: list[tuple[str, dict]], result: dict | None = None,
                     error: tuple[str, str] | None = None) -> threading.Thread:
        """In a thread: wait for the next submitted job, then run it through the real JobStore as a worker
        would (start, append `events`, then fail with `error` or succeed with `result`). Join it after."""
        def run() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not self.redis.keys("job:*:events"):
                time.sleep(0.02)
            job_id = self.redis.keys("job:*:events")[0].split(":")[1]
            time.sleep(0.1)  # let the client start following the job before it moves
            self.store.try_start(job_id, "w")
            for event_type, data in events:
                self.store.append_event(job_id, event_type, data)
            if error:
                self.store.fail(job_id, *error)
            else:
                self.store.succeed(job_id, result or {})

        thread = threading.Thread(target=run)
        thread.start()
        return thread


@pytest.fixture
def start_api(fresh_redis_url: str, tokenizer_model_dir: Path) -> Iterator[Callable[..., RunningApi]]:
    """Factory: start the app with `Settings` overrides on a fresh Redis database; stopped after the test."""
    stack: list = []

    def start(**overrides) -> RunningApi:
        values = {"redis_url": fresh_redis_url, "model": str(tokenizer_model_dir), "max_prompt_tokens": 64,
                  "max_new_tokens_limit": 128, "max_body_bytes": 4096, "max_document_chars": 500,
                  "sse_keepalive_seconds": 0.2, **overrides}
        settings = Settings(**values)
        context = serve_in_thread(create_app(settings))
        url = context.__enter__()
        stack.append(context)
        client = redis.Redis.from_url(fresh_redis_url, decode_responses=True)
        http = httpx.Client(base_url=url, timeout=10.0)
        stack.append(http)
        return RunningApi(url=url, settings=settings, store=JobStore(client, settings), redis=client, http=http)

    yield start
    for item in reversed(stack):
        if isinstance(item, httpx.Client):
            item.close()
        else:
            item.__exit__(None, None, None)
