"""Fill-in-the-middle through the official SDK (its generic `post`, as users call endpoints it has no
method for): `POST /v1/fim/completions`, and `suffix` on `/v1/completions`, both on the edit/infill path."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.integration.conftest import Stack, submit, wait_for_status

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
PREFIX, SUFFIX = "def total(items):\n    return ", "\n\n\nprint(total([1, 2]))  # ünïcode ✓\r\n"


def _fim(client: openai.OpenAI, **body: object) -> dict:
    return client.post("/fim/completions", body=body, cast_to=object)  # type: ignore[return-value]


def test_fim_runs_as_an_edit_job_with_the_suffix_kept(client: openai.OpenAI, stack: Stack):
    answer = _fim(client, model=stack.settings().model_name, prompt=PREFIX, suffix=SUFFIX, max_tokens=6, seed=3,
                  max_denoising_steps=4)
    assert answer["object"] == "chat.completion" and answer["id"].startswith("fim-")
    middle = answer["choices"][0]["message"]["content"]
    job = httpx.get(f"{stack.api_url}/v1/jobs/{answer['id'].removeprefix('fim-')}", timeout=10).json()
    assert job["kind"] == "edit" and job["status"] == "succeeded"
    document = job["result"]["document"]
    assert document == PREFIX + middle + SUFFIX  # both sides byte-identical around the generated middle
    assert answer["usage"]["completion_tokens"] == job["result"]["edits"][0]["tokens"] <= 6
    assert answer["usage"]["prompt_tokens"] > 0
    # The same insertion submitted as an edit job gives the same middle: FIM is the edit path.
    with stack.client() as http:
        edit_id = submit(http, {"kind": "edit", "document": PREFIX + SUFFIX, "max_new_tokens": 6, "seed": 3,
                                "max_denoising_steps": 4, "edits": [{"start": len(PREFIX), "end": len(PREFIX)}]})
        view = wait_for_status(http, edit_id, {"succeeded", "failed"})
    assert view["result"]["edits"][0]["replacement"] == middle


def test_fim_stream_stop_and_completions_suffix(client: openai.OpenAI, stack: Stack):
    model = stack.settings().model_name
    plain = _fim(client, model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, seed=5, max_denoising_steps=4)
    middle = plain["choices"][0]["message"]["content"]
    via_completions = client.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, seed=5,
                                                extra_body={"max_denoising_steps": 4})
    assert via_completions.choices[0].text == middle
    with httpx.stream("POST", f"{stack.api_url}/v1/fim/completions", timeout=60, json={
            "model": model, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "seed": 5,
            "max_denoising_steps": 4, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == middle
    if len(middle) > 2:
        stopped = _fim(client, model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, seed=5,
                       max_denoising_steps=4, stop=[middle[1:3]])
        assert stopped["choices"][0]["message"]["content"] == middle[:middle.index(middle[1:3])]
        assert stopped["choices"][0]["finish_reason"] == "stop"


def test_fim_refusals(client: openai.OpenAI, stack: Stack):
    model = stack.settings().model_name
    for body, param in (({"min_tokens": 3}, "min_tokens"), ({"n": 2}, "n"), ({"temperature": 3}, "temperature"),
                        ({"suffix": 5}, "suffix")):
        with pytest.raises(openai.BadRequestError) as caught:
            _fim(client, model=model, prompt="a", **body)
        assert caught.value.body["param"] == param
