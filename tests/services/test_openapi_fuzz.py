"""Schema-driven fuzzing (schemathesis) of every operation in the served OpenAPI document, against the real
app over HTTP on a real Redis, with and without API keys: no 5xx, and no status, header, content type or
body that the document does not describe (issue 11).

A small thread plays the worker through the real `JobStore` (start, then succeed every queued job), so the
OpenAI-compatible routes, which wait for their job, answer instead of waiting for a deadline. Hypothesis
examples are bounded (`EXAMPLES` per operation and mode) so the whole run takes about a minute.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings

from dgtext.request_rules import ModelLimits
from services.api.app import create_app
from services.jobs import JobStore
from services.settings import Settings
from tests.services.api_keys import KEY_A
from tests.support.api_server import serve_in_thread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
EXAMPLES = 6
LIMITS = ModelLimits(canvas_length=32, max_positions=1024).to_json_dict()
# A 413 (body over max_body_bytes) is as much a refusal of schema-violating data as a 422. A job body the
# document admits may still be refused with 422 for what a schema cannot state (its length in the model's
# tokens, a `find` string that does not occur, a span past the document's end, positions per request).
CONFIG = schemathesis.Config.from_dict({
    "checks": {"negative_data_rejection": {
        "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]}},
    "operations": [{"include-method": "POST", "checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", 401, 404, 409, 413, 422, 429]}}}],
})
RESULT = {"text": "ok", "finish_reason": "stop", "usage": {"prompt_tokens": 1, "generated_tokens": 1}}


@dataclass(frozen=True)
class FuzzTarget:
    open_url: str  # no API keys configured
    keyed_url: str  # DGSERVE_API_KEYS set: requests with KEY_A, and without any key


def _finish_queued_jobs(stores: list[JobStore], stop: threading.Event) -> None:
    """What a worker does, minus the model: heartbeat with its limits, start every queued job, succeed it."""
    while not stop.wait(0.02):
        for store in stores:
            store.heartbeat("fuzz-worker", {"queue": store.settings.queue_name, "limits": LIMITS})
            for job_id in store.redis.zrange(store.queued_key, 0, 50):
                if store.try_start(job_id, "fuzz-worker").should_run:
                    store.succeed(job_id, RESULT)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory, redis_instance, tokenizer_model_dir: Path
                ) -> Iterator[FuzzTarget]:
    common = {"model": str(tokenizer_model_dir), "max_prompt_tokens": 256, "max_new_tokens_limit": 256,
              "max_body_bytes": 8192, "max_document_chars": 2000, "max_queued_jobs": 50,
              "sse_keepalive_seconds": 0.2, "job_deadline_seconds": 30}
    open_settings = Settings(redis_url=f"redis://127.0.0.1:{redis_instance.port}/60", **common)
    keyed_settings = Settings(redis_url=f"redis://127.0.0.1:{redis_instance.port}/61", api_keys=KEY_A, **common)
    for database in (60, 61):
        redis.Redis(port=redis_instance.port, db=database).flushdb()
    stores = [JobStore.from_settings(open_settings), JobStore.from_settings(keyed_settings)]
    stop = threading.Event()
    worker = threading.Thread(target=_finish_queued_jobs, args=(stores, stop), daemon=True)
    with serve_in_thread(create_app(open_settings)) as open_url, serve_in_thread(create_app(keyed_settings)) as keyed:
        worker.start()
        try:
            yield FuzzTarget(open_url=open_url, keyed_url=keyed)
        finally:
            stop.set()
            worker.join(timeout=10)


# The document does not depend on the settings (the test below checks the served one is the same), so it is
# built here, at collection time, without a server.
DOCUMENT = create_app(Settings(model="unused", redis_url="redis://127.0.0.1:1/0")).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


def test_the_fuzzed_document_is_the_served_one(fuzz_target: FuzzTarget):
    for url in (fuzz_target.open_url, fuzz_target.keyed_url):
        assert httpx.get(f"{url}/openapi.json", timeout=10).json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_every_operation_answers_as_documented(case, fuzz_target: FuzzTarget):
    case.call_and_validate(base_url=fuzz_target.open_url, timeout=30)
    case.call_and_validate(base_url=fuzz_target.keyed_url, headers={"Authorization": f"Bearer {KEY_A}"},
                           timeout=30)
    case.call_and_validate(base_url=fuzz_target.keyed_url, timeout=30)
