"""Every job the API accepts is one the engine runs (issue 11): the API checks submissions with the same
`dgtext.request_rules` the engine applies, against the limits workers publish with their heartbeat.

Each API case here was a 202 (then a failed job, or a 500 through the OpenAI routes) before the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from dgtext.byte_tokenizer import build_byte_tokenizer
from dgtext.request_rules import ModelLimits, RequestFieldError, resolve_sampling
from dgtext.save_tokenizer import save_tokenizer_files
from dgtext.tokenizer import PromptTokenizer
from services.prompt_limits import published_limits
from services.schemas import EditJobCreate, GenerateJobCreate
from worker.edit_jobs import prepare_edit

# What a worker serving the embedded model publishes (canvas 32, max_context 4096, its sampler defaults).
SERVED = ModelLimits(canvas_length=32, max_positions=4096, sampling_defaults={
    "max_new_tokens": 128, "max_denoising_steps": 32, "entropy_bound": 0.1, "t_min": 0.95, "t_max": 1.0,
    "stability_threshold": 1, "confidence_threshold": 0.005})
ROOMY = {"max_new_tokens_limit": 8192, "max_prompt_tokens": 30_000, "max_body_bytes": 1 << 20,
         "max_document_chars": 30_000}


def publish(api, limits: ModelLimits = SERVED, worker_id: str = "w1") -> None:
    """What a worker's heartbeat writes (worker/runtime.py): its queue and its engine's request limits."""
    api.store.heartbeat(worker_id, {"queue": api.settings.queue_name, "limits": limits.to_json_dict()})


def refused(api, body: dict, path: str = "/v1/jobs") -> dict:
    response = api.http.post(path, json=body)
    assert response.status_code == 422, response.text
    assert api.queue_length() == 0 and not api.redis.keys("job:*")  # nothing stored, nothing enqueued
    return response.json()["error"]


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"prompt": "import sys", "max_new_tokens": 4096}, "max_new_tokens", "over the 4096 the served model holds"),
    ({"prompt": "x" * 5000}, "prompt", "5001 prompt tokens leave room for no canvas"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages", "leave room for no canvas"),
    ({"kind": "edit", "document": "y" * 20_000, "edits": [{"start": 17_000, "end": 17_010}]}, "document",
     "edit a shorter excerpt"),
    ({"kind": "edit", "document": "abc", "edits": [{"start": 0, "end": 1, "max_tokens": 0}]}, "edits",
     "nothing for the model to write"),
    ({"prompt": "a", "t_max": 0}, "t_max", "greater than 0"),
    ({"prompt": "a", "t_max": 0.5}, "t_max", "below t_min 0.95 (the model's default)"),
    ({"prompt": "a", "t_min": 2.0}, "t_min", "t_max 1.0 (the model's default) is below t_min 2.0"),
    ({"prompt": "a", "max_new_tokens": True}, "max_new_tokens", "valid integer"),
    ({"prompt": "a", "max_new_tokens": "8"}, "max_new_tokens", "valid integer"),
    ({"prompt": "a", "max_new_tokens": 8.0}, "max_new_tokens", "valid integer"),
    ({"prompt": "a", "seed": "7"}, "seed", "valid integer"),
    ({"prompt": "a", "t_min": "0.5"}, "t_min", "valid number"),
    ({"prompt": "a", "stream_drafts": 1}, "stream_drafts", "valid boolean"),
    ({"kind": "edit", "document": "abcdefgh", "edits": [{"start": True, "end": 4}]}, "edits[0].start",
     "valid integer"),
])
def test_what_the_engine_would_refuse_is_a_422_naming_the_field(start_api, body, field, message):
    api = start_api(**ROOMY)
    publish(api)
    error = refused(api, body)
    assert error["field"] == field and message in error["message"], error


def test_equal_temperatures_and_an_insertion_before_a_touching_span_are_accepted(start_api):
    api = start_api(**ROOMY)
    publish(api)
    equal = api.http.post("/v1/jobs", json={"prompt": "a", "t_min": 0.7, "t_max": 0.7})
    assert equal.status_code == 202, equal.text
    touching = api.http.post("/v1/jobs", json={"kind": "edit", "document": "abcdefgh",
                                               "edits": [{"start": 4, "end": 4, "max_tokens": 2},
                                                         {"start": 4, "end": 8}]})
    assert touching.status_code == 202, touching.text
    assert api.queue_length() == 2


def test_openai_routes_refuse_with_422_not_500(start_api):
    api = start_api(**ROOMY)
    publish(api)
    assert refused(api, {"prompt": "import sys", "max_tokens": 4096}, "/v1/completions")["field"] == "max_new_tokens"
    chat = {"messages": [{"role": "user", "content": "hi"}], "t_max": 0.5}
    assert refused(api, chat, "/v1/chat/completions")["field"] == "t_max"


def test_the_most_restrictive_live_worker_decides_and_limits_refresh(start_api, monkeypatch):
    monkeypatch.setattr("services.prompt_limits.REFRESH_SECONDS", 0.0)
    api = start_api(**ROOMY)
    body = {"prompt": "import sys", "max_new_tokens": 1024}
    publish(api, ModelLimits(32, 8192, SERVED.sampling_defaults), worker_id="big")
    assert api.http.post("/v1/jobs", json=body).status_code == 202
    publish(api, ModelLimits(32, 512, SERVED.sampling_defaults), worker_id="small")
    response = api.http.post("/v1/jobs", json=body)
    assert response.status_code == 422 and "over the 512" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer folder that also has the checkpoint's config.json and generation_config.json."""
    folder = tmp_path_factory.mktemp("models") / "tiny-ckpt"
    save_tokenizer_files(build_byte_tokenizer(512), folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma", "canvas_length": 32,
                                                    "text_config": {"max_position_embeddings": 1024}}))
    (folder / "generation_config.json").write_text(json.dumps({"t_min": 0.9, "t_max": 1.0, "max_new_tokens": 64}))
    return folder


def test_before_any_worker_published_the_checkpoint_limits_apply(start_api, checkpoint_dir):
    api = start_api(model=str(checkpoint_dir), **ROOMY)
    assert refused(api, {"prompt": "a", "t_max": 0.5})["field"] == "t_max"
    assert "over the 1024" in refused(api, {"prompt": "a", "max_new_tokens": 2048})["message"]
    assert api.http.post("/v1/jobs", json={"prompt": "a", "max_new_tokens": 900}).status_code == 202


# ---- the rules themselves, and that API and worker agree on spans -------------------------------------

def test_sampling_rules_fill_defaults_and_blame_the_field_that_was_set():
    defaults = dict(SERVED.sampling_defaults)
    assert resolve_sampling({"t_min": 0.5, "t_max": 0.5}, defaults)["t_max"] == 0.5
    assert resolve_sampling({}, defaults)["max_new_tokens"] == 128
    with pytest.raises(RequestFieldError) as caught:
        resolve_sampling({"t_max": 0.5}, defaults)
    assert caught.value.field == "t_max"
    with pytest.raises(RequestFieldError, match="max_denoising_steps: must be an integer"):
        resolve_sampling({"max_denoising_steps": 2.0}, defaults)


def test_published_limits_skip_other_queues_and_malformed_entries():
    good = ModelLimits(32, 4096).to_json_dict()
    workers = [{"queue": "q", "limits": good}, {"queue": "other", "limits": {**good, "max_positions": 64}},
               {"queue": "q", "limits": {"canvas_length": "x"}}, {"queue": "q"}]
    assert published_limits(workers, "q") == ModelLimits(32, 4096)
    assert published_limits([{"queue": "q"}], "q") is None


def test_the_schema_and_the_edit_planner_agree_on_spans(tokenizer_model_dir):
    tokenizer = PromptTokenizer.from_dir(tokenizer_model_dir)
    touching = EditJobCreate(document="abcdefgh", edits=[{"start": 4, "end": 4, "max_tokens": 2},
                                                          {"start": 4, "end": 8}])
    assert len(prepare_edit(touching, tokenizer, 32, 16).plan.spans) == 2
    for edits in ([{"start": 4, "end": 4}, {"start": 4, "end": 4}], [{"start": 2, "end": 6}, {"start": 4, "end": 8}]):
        with pytest.raises(ValidationError, match=r"edits\[1\]: span"):
            EditJobCreate(document="abcdefgh", edits=edits)
    with pytest.raises(ValidationError, match="t_max"):
        GenerateJobCreate(prompt="a", t_min=0.8, t_max=0.2)
