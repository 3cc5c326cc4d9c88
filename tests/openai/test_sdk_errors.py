"""Refusals through the official SDK: every refused parameter is a 400 naming it (BadRequestError), and
the other statuses map to the SDK's exception classes. Nothing is enqueued for a refused request."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import openai
import pytest

from services.api.app import create_app
from services.jobs import JobStore
from tests.integration.conftest import Stack
from tests.openai.conftest import KEYS, KeyedApi, sdk
from tests.support.api_server import serve_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
USER = [{"role": "user", "content": "hi"}]


def _refused(call: Any, error: type[openai.APIStatusError] = openai.BadRequestError) -> dict:
    with pytest.raises(error) as caught:
        call()
    body = caught.value.body
    assert set(body) >= {"message", "type", "param", "code"}, body
    return body


@pytest.mark.parametrize(("params", "param"), [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1.0}, "frequency_penalty"),
    ({"logit_bias": {"17": 5}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "none"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [*USER, {"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"not_a_parameter": 1}}, "not_a_parameter"),
    ({"extra_body": {"t_min": 0.9, "t_max": 0.5}}, "t_max"),
])
def test_chat_refusals_name_the_field(client: openai.OpenAI, stack: Stack, params: dict, param: str):
    queue = stack.store().redis
    before = queue.llen("dgemma.itest")
    arguments = {"model": stack.settings().model_name, "messages": USER, **params}
    body = _refused(lambda: client.chat.completions.create(**arguments))
    assert body["param"] == param and body["type"] == "invalid_request_error", body
    assert param.split("[")[0] in body["message"]
    assert queue.llen("dgemma.itest") == before


def test_completion_refusals(client: openai.OpenAI, stack: Stack):
    model = stack.settings().model_name
    assert _refused(lambda: client.completions.create(model=model, prompt="x", best_of=3))["param"] == "best_of"
    assert _refused(lambda: client.completions.create(model=model, prompt="x", echo=True,
                                                      logprobs=2))["param"] == "echo"
    assert _refused(lambda: client.completions.create(model=model, prompt=[10**9]))["param"].startswith("prompt")
    assert _refused(lambda: client.completions.create(model=model, prompt="x", stop=["a"] * 17))["param"] == "stop"
    assert _refused(lambda: client.completions.create(model=model, prompt="x", n=17))["param"] == "n"
    missing = _refused(lambda: client.completions.create(model="gpt-4", prompt="x"), openai.NotFoundError)
    assert missing["code"] == "model_not_found" and missing["type"] == "not_found_error"


def test_body_too_large_is_413(client: openai.OpenAI, stack: Stack):
    body = _refused(lambda: client.completions.create(model=stack.settings().model_name, prompt="x" * 1_100_000),
                    openai.APIStatusError)
    assert body["code"] == "body_too_large"


def test_auth_isolation_and_rate_limit(keyed_api: KeyedApi, stack: Stack):
    model = stack.settings().model_name
    with sdk(keyed_api.url, "wrong-key-000") as stranger:
        assert _refused(lambda: stranger.models.list(), openai.AuthenticationError)["type"] == "authentication_error"
    with keyed_api.client(KEYS[0]) as alice:
        assert alice.models.list().data[0].id == model


def test_rate_limit_is_429_and_redis_down_is_503(stack: Stack):
    limited = stack.settings(queue_name="dgemma.itest", max_jobs_per_minute_per_key=1)
    with serve_in_thread(create_app(limited)) as url, sdk(url) as client:
        def submit_until_refused() -> None:
            for _ in range(3):  # the limit's window is a calendar minute: one may roll over in between
                client.completions.create(model=limited.model_name, prompt="a", max_tokens=4,
                                          extra_body={"max_denoising_steps": 2})

        body = _refused(submit_until_refused, openai.RateLimitError)
        assert body["code"] == "rate_limited" and body["type"] == "rate_limit_error"
    down = stack.settings(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with serve_in_thread(create_app(down)) as url, sdk(url) as client:
        body = _refused(lambda: client.completions.create(model=down.model_name, prompt="b"),
                        openai.InternalServerError)
        assert body["type"] == "service_unavailable_error"


def _new_job(store: JobStore, known: set[str]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fresh = {key.split(":")[1] for key in store.redis.scan_iter("job:*:events")} - known
        if fresh:
            return fresh.pop()
        time.sleep(0.02)
    raise TimeoutError("no job was created")


@pytest.mark.parametrize(("end", "error"), [("cancel", openai.ConflictError), ("fail", openai.InternalServerError)])
def test_cancelled_and_failed_jobs_map_to_409_and_500(client: openai.OpenAI, stack: Stack, end: str,
                                                      error: type[openai.APIStatusError]):
    store = stack.store()
    known = {key.split(":")[1] for key in store.redis.scan_iter("job:*:events")}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.completions.create, model=stack.settings().model_name, prompt="x",
                           max_tokens=512, extra_body={"max_denoising_steps": 64, "confidence_threshold": 1e-6})
        job_id = _new_job(store, known)
        if end == "cancel":
            assert store.cancel(job_id) in ("cancelled", "cancel_requested")
        else:
            assert store.fail(job_id, "engine_error", "device lost")
        with pytest.raises(error) as caught:
            call.result(timeout=120)
    assert caught.value.body["type"] == ("conflict_error" if end == "cancel" else "server_error")
