"""The Batch API through the official SDK against the real stack: files, batches, request_counts, output
and error files checked line by line against `custom_id`, cancel and expiry keeping partial results,
per-key isolation, and interactive requests served ahead of batch lines."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import openai
import pytest

from services.api.app import create_app
from tests.integration.conftest import Stack
from tests.openai.conftest import KEYS, KeyedApi, sdk
from tests.support.api_server import serve_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
FINAL = {"completed", "failed", "cancelled", "expired"}


def _line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _chat(index: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"line {index}"}], "max_tokens": 8, "seed": index,
            "max_denoising_steps": 3, **extra}


def _upload(client: openai.OpenAI, lines: list[str]) -> str:
    data = ("\n".join(lines) + "\n").encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 400) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.3)
    raise TimeoutError(f"batch {batch_id} did not reach {statuses}: {batch}")


def _jsonl(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines)  # one line per request
    return by_id


def _sync_chat(client: openai.OpenAI, body: dict[str, Any]) -> Any:
    """The synchronous route with the same body: dgserve's own fields go in `extra_body`, as users send them."""
    extra = {name: body.pop(name) for name in ("max_denoising_steps",) if name in body}
    return client.chat.completions.create(**body, extra_body=extra)


BAD_LINES = {
    "bad-penalty": _chat(0, presence_penalty=1.0),
    "bad-image": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    "bad-max-tokens": _chat(0, max_tokens=100_000),
    "bad-model": _chat(0, model="gpt-4"),
}


def test_batch_of_60_lines_with_bad_lines(client: openai.OpenAI, stack: Stack):
    good = {f"req-{i}": _chat(i) for i in range(56)}
    lines = [_line(cid, body) for cid, body in {**good, **BAD_LINES}.items()]
    lines += ["{not json", _line("req-0", _chat(1)), _line("wrong-url", _chat(2), url="/v1/completions")]
    file_id = _upload(client, lines)
    assert client.files.retrieve(file_id).purpose == "batch"
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"run": "t1"})
    assert batch.status == "in_progress" and batch.request_counts.total == len(lines)
    assert batch.request_counts.failed == len(BAD_LINES) + 3  # refused at submission
    done = _wait(client, batch.id, FINAL)
    assert done.status == "completed" and done.metadata == {"run": "t1"}
    assert done.request_counts.completed == 56 and done.request_counts.failed == len(BAD_LINES) + 3
    outputs, errors = _jsonl(client, done.output_file_id), _jsonl(client, done.error_file_id)
    assert set(outputs) == set(good)
    for custom_id in good:
        response = outputs[custom_id]["response"]
        assert response["status_code"] == 200 and response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["finish_reason"] in ("stop", "length")
    for custom_id in ("req-3", "req-40"):  # a line's answer is what the synchronous route answers
        sync = _sync_chat(client, {"model": stack.settings().model_name, **good[custom_id]})
        assert outputs[custom_id]["response"]["body"]["choices"][0]["message"]["content"] == \
            sync.choices[0].message.content
    for custom_id, body in BAD_LINES.items():  # the same error as the synchronous route
        error = errors[custom_id]["response"]
        with pytest.raises(openai.APIStatusError) as caught:
            _sync_chat(client, {"model": stack.settings().model_name, **body})
        assert error["status_code"] == caught.value.status_code and error["body"]["error"] == caught.value.body
    assert errors["wrong-url"]["response"]["body"]["error"]["param"] == "url"
    assert errors["req-0"]["response"]["body"]["error"]["param"] == "custom_id"  # the duplicate's entry
    assert len(errors) == len(BAD_LINES) + 3 and None in errors  # + duplicate, wrong url, unparsable (no id)
    listed = client.batches.list(limit=5)
    assert batch.id in [b.id for b in listed.data]


def _slow_lines(count: int) -> list[str]:
    return [_line(f"slow-{i}", {"prompt": f"n{i}", "max_tokens": 96, "seed": i, "max_denoising_steps": 24,
                                "confidence_threshold": 1e-9, "stability_threshold": 1000}, url="/v1/completions")
            for i in range(count)]


def test_cancel_mid_batch_keeps_finished_lines(client: openai.OpenAI):
    file_id = _upload(client, _slow_lines(50))
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while client.batches.retrieve(batch.id).request_counts.completed < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait(client, batch.id, FINAL)
    assert done.status == "cancelled" and done.cancelled_at is not None
    counts = done.request_counts
    outputs, errors = _jsonl(client, done.output_file_id), _jsonl(client, done.error_file_id)
    assert 2 <= counts.completed < 50 and counts.completed + counts.failed == 50
    assert len(outputs) == counts.completed and set(outputs) | set(errors) == {f"slow-{i}" for i in range(50)}
    assert all(line["response"]["body"]["object"] == "text_completion" for line in outputs.values())
    assert {line["error"]["code"] for line in errors.values() if line["error"]} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_expiry_keeps_finished_lines(client: openai.OpenAI):
    file_id = _upload(client, _slow_lines(40))
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                  completion_window="8s")  # type: ignore[arg-type]  # a dgserve extension
    done = _wait(client, batch.id, FINAL, timeout=120)
    assert done.status == "expired" and done.expired_at is not None
    outputs, errors = _jsonl(client, done.output_file_id), _jsonl(client, done.error_file_id)
    assert len(outputs) == done.request_counts.completed and len(outputs) + len(errors) == 40
    assert {line["error"]["code"] for line in errors.values() if line["error"]} <= {"batch_expired"}


def test_files_and_batches_belong_to_their_key(keyed_api: KeyedApi):
    with keyed_api.client(KEYS[0]) as alice, keyed_api.client(KEYS[1]) as bob:
        file_id = _upload(alice, [_line("only", _chat(1))])
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(file_id)
        with pytest.raises(openai.NotFoundError):
            bob.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            bob.batches.retrieve(batch.id)
        assert batch.id not in [b.id for b in bob.batches.list().data]
        done = _wait(alice, batch.id, FINAL)
        assert done.status == "completed" and set(_jsonl(alice, done.output_file_id)) == {"only"}
        assert alice.files.delete(file_id).deleted
        with pytest.raises(openai.NotFoundError):
            alice.files.content(file_id)


def test_interactive_requests_go_ahead_of_batch_lines(client: openai.OpenAI, stack: Stack):
    batch = client.batches.create(input_file_id=_upload(client, _slow_lines(80)), endpoint="/v1/completions",
                                  completion_window="24h")
    time.sleep(1.0)  # the worker is busy with batch lines and more are queued behind them
    started = time.monotonic()
    answer = client.completions.create(model=stack.settings().model_name, prompt="now", max_tokens=8,
                                       extra_body={"max_denoising_steps": 3})
    waited = time.monotonic() - started
    counts = client.batches.retrieve(batch.id).request_counts
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert counts.completed < 40, (waited, counts)  # served long before the batch's queued lines
    client.batches.cancel(batch.id)
    _wait(client, batch.id, FINAL)


def test_file_and_batch_refusals(client: openai.OpenAI, stack: Stack):
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"
    file_id = _upload(client, [_line("a", _chat(1))])
    for arguments, param in (({"endpoint": "/v1/embeddings"}, "endpoint"),
                             ({"completion_window": "soon"}, "completion_window"),
                             ({"input_file_id": "file-missing"}, "file_id")):
        call = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **arguments}
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as caught:
            client.batches.create(**call)
        assert caught.value.body["param"] == param
    small = stack.settings(queue_name="dgemma.itest", max_batch_file_bytes=1024)
    with serve_in_thread(create_app(small)) as url, sdk(url) as limited:
        with pytest.raises(openai.APIStatusError) as caught:
            limited.files.create(file=("big.jsonl", io.BytesIO(b"x" * 5000)), purpose="batch")
        assert caught.value.status_code == 413 and "max_batch_file_bytes" in caught.value.body["message"]
