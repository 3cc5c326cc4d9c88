"""OpenAI-compatible routes over real HTTP; the job is run through the real JobStore as a worker would."""

from __future__ import annotations

import json

import httpx

CANVASES = [("canvas", {"canvas": index, "step": 3, "text": text}) for index, text in enumerate(["Once upon", " a time"])]
RESULT = {"text": "Once upon a time", "finish_reason": "length",
          "usage": {"prompt_tokens": 5, "generated_tokens": 16, "canvases": 2}}


def test_models_lists_the_served_model(start_api):
    api = start_api()
    assert api.http.get("/v1/models").json()["data"][0]["id"] == "tiny-api"


def test_completion_waits_for_the_job(start_api):
    api = start_api()
    worker = api.run_next_job(CANVASES, RESULT)
    response = api.http.post("/v1/completions", json={"model": "tiny-api", "prompt": "Tell me", "max_tokens": 16,
                                                      "seed": 5, "max_denoising_steps": 12})
    worker.join(timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Once upon a time"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}
    job = api.store.get(body["id"].removeprefix("cmpl-"))
    assert job.request.max_new_tokens == 16 and job.request.seed == 5 and job.request.max_denoising_steps == 12


def test_chat_completion_streams_canvases_then_done(start_api):
    api = start_api()
    worker = api.run_next_job(CANVASES, RESULT)
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", timeout=10.0,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    worker.join(timeout=10)
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Once upon a time"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 21


def test_failed_job_and_bad_requests(start_api):
    api = start_api()
    worker = api.run_next_job(CANVASES, error=("engine_error", "device lost"))
    failed = api.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    worker.join(timeout=10)
    assert failed.status_code == 500 and failed.json()["error"] == {
        "message": "device lost", "type": "server_error", "param": None, "code": "engine_error"}
    wrong_model = api.http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    unknown = api.http.post("/v1/completions", json={"prompt": "x", "logprobs": 3, "foo": 1})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "foo"
    too_long = api.http.post("/v1/completions", json={"prompt": "x" * 100})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
    over_limit = api.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1000})
    error = over_limit.json()["error"]
    assert over_limit.status_code == 400 and error["param"] == "max_tokens" and "max_tokens" in error["message"]
    oversized = api.http.post("/v1/chat/completions", content=b"{" + b" " * 5000 + b"}",
                              headers={"content-type": "application/json"})
    assert oversized.status_code == 413 and oversized.json()["error"]["code"] == "body_too_large"
    assert api.queue_length() == 1  # only the job that ran was enqueued


def test_stop_strings_cut_streamed_canvases(start_api):
    api = start_api()
    canvases = [("canvas", {"canvas": 0, "step": 3, "text": "Once up"}), ("canvas", {"canvas": 1, "step": 3,
                                                                            "text": "on a time"})]
    worker = api.run_next_job(canvases, {**RESULT, "text": "Once ", "finish_reason": "stop"})
    with httpx.stream("POST", f"{api.url}/v1/completions", timeout=10.0,
                      json={"prompt": "x", "stream": True, "stop": ["upon"]}) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    worker.join(timeout=10)
    chunks = [json.loads(line) for line in lines[:-1]]
    # "Once up" may still become "Once upon": only "Once " is sent until the next canvas settles it.
    assert [c["choices"][0]["text"] for c in chunks] == ["Once ", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
