"""POST /v1/jobs over real HTTP: acceptance, validation (422 naming the field), 413, 429, idempotency.
Every refused request must leave the Celery queue empty."""

from __future__ import annotations

import base64
import json

import pytest

from tests.services.api_keys import KEY_A, KEY_B

GOOD = {"prompt": "Hello there", "max_new_tokens": 16, "seed": 7}
DOC = "alpha beta gamma beta\n"


def test_submit_returns_202_location_and_enqueues_the_id_only(start_api):
    api = start_api()
    response = api.http.post("/v1/jobs", json=GOOD)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['id']}" == body["location"]
    assert body["status"] == "queued" and body["kind"] == "generate" and body["expires_at"] > body["created_at"]
    assert api.queue_length() == 1
    message = json.loads(api.redis.lindex(api.settings.queue_name, 0))
    assert message["headers"]["task"] == "dgserve.run_job"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == [body["id"]] and kwargs == {}  # the payload lives in the job record, not the message
    job = api.http.get(response.headers["location"]).json()
    assert job["status"] == "queued" and job["attempts"] == 0 and job["timings"]["created_at"] == body["created_at"]
    assert api.store.get(body["id"]).request.prompt == "Hello there"


def test_edit_job_is_accepted(start_api):
    api = start_api()
    response = api.http.post("/v1/jobs", json={"kind": "edit", "document": DOC,
                                               "edits": [{"start": 0, "end": 5, "instruction": "capitalise"}]})
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "edit" and api.queue_length() == 1


TOO_MANY_TOKENS = "x" * 80  # byte tokenizer: 80 tokens + bos > max_prompt_tokens=64
INVALID_BODIES = [
    ({}, "prompt", "exactly one"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt", "exactly one"),
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
    ({"prompt": "a", "max_new_tokens": 129}, "max_new_tokens", "max_new_tokens_limit"),
    ({"prompt": "a", "t_min": 0.9, "t_max": 0.1}, "t_max", "below t_min"),
    ({"prompt": "a", "entropy_bound": -1}, "entropy_bound", "greater than 0"),
    ({"prompt": "a", "temperature": 1}, "temperature", "Extra inputs are not permitted"),
    ({"prompt": "a", "stream_drafts": "maybe"}, "stream_drafts", "boolean"),
    ({"kind": "translate", "prompt": "a"}, "kind", "'generate' or 'edit'"),
    ({"messages": [{"role": "robot", "content": "b"}]}, "messages[0].role", "'system', 'user' or 'assistant'"),
    ({"prompt": TOO_MANY_TOKENS}, "prompt", "81 tokens"),
    ({"messages": [{"role": "user", "content": TOO_MANY_TOKENS}]}, "messages", "max_prompt_tokens"),
    ({"kind": "edit", "document": DOC, "edits": []}, "edits", "at least 1 item"),
    ({"kind": "edit", "document": DOC, "edits": [{"start": 0, "end": 5}, {"start": 3, "end": 8}]},
     "edits[1]", "overlaps edits[0]"),
    ({"kind": "edit", "document": DOC, "edits": [{"start": 20, "end": 40}]}, "edits[0]", "outside the document"),
    ({"kind": "edit", "document": DOC, "edits": [{"start": 4, "end": 2}]}, "edits[0]", "after end"),
    ({"kind": "edit", "document": DOC, "edits": [{"start": 0, "end": 1}, {"find": "delta"}]},
     "edits[1]", "does not occur"),
    ({"kind": "edit", "document": DOC, "edits": [{"find": "beta"}]}, "edits[0]", "more than once"),
    ({"kind": "edit", "document": DOC, "edits": [{"find": "alpha", "start": 0, "end": 5}]}, "edits[0]", "not both"),
    ({"kind": "edit", "document": DOC, "edits": [{"start": 0}]}, "edits[0]", "give both start and end"),
    ({"kind": "edit", "document": "y" * 501, "edits": [{"start": 0, "end": 1}]}, "document", "max_document_chars"),
    ({"kind": "edit", "document": "y" * 90, "edits": [{"start": 0, "end": 1}]}, "document", "max_prompt_tokens"),
    ({"kind": "edit", "document": DOC, "edits": [{"start": 0, "end": 1, "max_tokens": 500}]}, "edits[0]",
     "max_new_tokens_limit"),
]


@pytest.mark.parametrize(("body", "field", "message"), INVALID_BODIES, ids=[f"{i}-{c[1]}" for i, c in
                                                                           enumerate(INVALID_BODIES)])
def test_invalid_body_is_422_naming_the_field_and_enqueues_nothing(start_api, body, field, message):
    api = start_api()
    response = api.http.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field
    assert message in error["message"]
    assert api.queue_length() == 0 and api.redis.keys("job:*") == []


def test_malformed_json_is_422(start_api):
    api = start_api()
    response = api.http.post("/v1/jobs", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]["message"]
    assert api.queue_length() == 0


def test_body_over_limit_is_413_by_header_and_by_actual_size(start_api):
    api = start_api(max_body_bytes=2048)
    big = {"prompt": "z" * 3000}
    declared = api.http.post("/v1/jobs", json=big)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the server must count what actually arrives
        for _ in range(6):
            yield b" " * 500
    streamed = api.http.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert api.queue_length() == 0 and api.redis.keys("job:*") == []


def test_admission_limit_is_429_with_retry_after(start_api):
    api = start_api(max_queued_jobs=2, retry_after_seconds=7)
    assert [api.http.post("/v1/jobs", json={"prompt": f"p{i}"}).status_code for i in range(2)] == [202, 202]
    refused = api.http.post("/v1/jobs", json={"prompt": "one more"})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
    assert refused.json()["error"]["code"] == "queue_full"
    assert api.queue_length() == 2


def test_idempotency_key_replays_or_conflicts(start_api):
    api = start_api()
    headers = {"Idempotency-Key": "order-42"}
    first = api.http.post("/v1/jobs", json=GOOD, headers=headers)
    again = api.http.post("/v1/jobs", json=dict(reversed(list(GOOD.items()))), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    conflict = api.http.post("/v1/jobs", json={**GOOD, "seed": 8}, headers=headers)
    assert conflict.status_code == 422 and conflict.json()["error"]["field"] == "Idempotency-Key"
    assert api.queue_length() == 1


def test_per_key_rate_limit_is_429_with_retry_after(start_api):
    api = start_api(api_keys=f"{KEY_A},{KEY_B}", max_jobs_per_minute_per_key=2)
    as_a, as_b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    codes = [api.http.post("/v1/jobs", json={"prompt": f"p{i}"}, headers=as_a).status_code for i in range(3)]
    if codes != [202, 202, 429]:  # the minute window turned over between the requests: measure once more
        codes = [api.http.post("/v1/jobs", json={"prompt": f"q{i}"}, headers=as_a).status_code for i in range(3)]
    assert codes[-1] == 429 and codes.count(202) <= 2
    limited = api.http.post("/v1/jobs", json={"prompt": "again"}, headers=as_a)
    assert limited.json()["error"]["code"] == "rate_limited" and 1 <= int(limited.headers["retry-after"]) <= 60
    assert api.http.post("/v1/jobs", json={"prompt": "b"}, headers=as_b).status_code == 202  # B has its own budget
