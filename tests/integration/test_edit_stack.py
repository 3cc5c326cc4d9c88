"""Edit jobs (issue 4) end to end through the real stack: HTTP API → Redis → Celery worker (tiny random
checkpoint) → result, using the shared stack of tests/integration/conftest.py."""

from __future__ import annotations

import concurrent.futures

import pytest

from dgtext.edit_result import unified_diff
from engine.engine import Engine
from services.schemas import TERMINAL_STATUSES, parse_job_create
from services.settings import model_short_name
from tests.integration.conftest import Stack, metric_samples, read_events, submit, wait_for_status
from worker.requests import prepare_job
from worker.runtime import model_info_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
TERMINAL = TERMINAL_STATUSES
STEPS = 4  # denoising steps per canvas: a random model never converges early, so cap it

DOCUMENT = ("Title: caf\u00e9 \U0001f469\u200d\U0001f4bb\r\n\tindented line\r\n"
            "\u05e9\u05dc\u05d5\u05dd world e\u0301\r\nlast line without newline")


def results_from_engine(model_dir, bodies: list[dict]) -> list[dict]:
    """The results the worker should store for these edit bodies, computed with the engine directly (all
    batched together: a seeded job gives the same tokens whatever it is batched with)."""
    engine = Engine.from_pretrained(model_dir, max_canvases_in_flight=len(bodies))
    info = model_info_of(engine)
    prepared = [prepare_job(parse_job_create(body), info) for body in bodies]
    results = engine.generate([job.request for job in prepared], max_steps=10_000)
    return [job.result(result.canvases, result.finished) for job, result in zip(prepared, results, strict=True)]


def assert_outside_spans_identical(old: str, result: dict) -> None:
    new, cursor_old, cursor_new = result["document"], 0, 0
    for edit in sorted(result["edits"], key=lambda e: e["original_start"]):
        assert new[cursor_new:edit["start"]].encode() == old[cursor_old:edit["original_start"]].encode()
        assert new[edit["start"]:edit["end"]] == edit["replacement"]
        cursor_old, cursor_new = edit["original_end"], edit["end"]
    assert new[cursor_new:].encode() == old[cursor_old:].encode()


def test_edit_job_streams_span_drafts_and_stores_the_edited_document(stack: Stack):
    body = {"kind": "edit", "document": DOCUMENT, "seed": 21, "max_denoising_steps": STEPS, "stream_drafts": True,
            "edits": [{"find": "indented", "instruction": "use a synonym"}, {"start": 7, "end": 11},
                      {"start": len(DOCUMENT), "end": len(DOCUMENT), "max_tokens": 6}]}
    with stack.client() as client:
        job_id = submit(client, body)
        events = read_events(client, job_id, until={"done", "failed"})
        view = wait_for_status(client, job_id, TERMINAL)
    assert view["status"] == "succeeded", view
    types = [event_type for event_type, _ in events]
    assert types[:2] == ["queued", "started"] and types[-1] == "done"
    drafts = [data for event_type, data in events if event_type == "draft"]
    assert drafts and set(drafts[0]) == {"canvas", "step", "edits"}
    assert set(drafts[0]["edits"]) <= {"0", "1", "2"} and drafts[0]["edits"]

    result = view["result"]
    assert [e["index"] for e in result["edits"]] == [0, 1, 2]
    assert (result["edits"][1]["original_start"], result["edits"][1]["original_end"]) == (7, 11)
    assert_outside_spans_identical(DOCUMENT, result)
    assert result["diff"] == unified_diff(DOCUMENT, result["document"])
    assert result["finish_reason"] == "stop" and result["usage"]["canvases"] >= 1
    expected = results_from_engine(stack.model_dir, [body])[0]
    assert {k: result[k] for k in ("document", "edits", "diff")} == \
        {k: expected[k] for k in ("document", "edits", "diff")}


def test_a_batch_of_edits_of_several_documents_is_processed_together(stack: Stack):
    documents = [f"doc {k}\tdef f{k}(x):\r\n    return x * {k}  # \U0001f600\n" + "filler text " * (3 * k)
                 + "end" for k in range(8)]
    bodies = [{"kind": "edit", "document": doc, "seed": 300 + k, "max_denoising_steps": STEPS,
               "edits": [{"find": f"f{k}"}, {"find": "return x"}]} for k, doc in enumerate(documents)]
    model = model_short_name(str(stack.model_dir))
    before = metric_samples(stack.worker.metrics_text(), "dgserve_batch_size_canvases_bucket")
    with stack.client() as client, concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        job_ids = list(pool.map(lambda body: submit(client, body), bodies))
        views = list(pool.map(lambda job_id: wait_for_status(client, job_id, TERMINAL), job_ids))
    assert [view["status"] for view in views] == ["succeeded"] * len(bodies)
    after = metric_samples(stack.worker.metrics_text(), "dgserve_batch_size_canvases_bucket")
    one, total = f'{{gpu="cpu",le="1.0",model="{model}"}}', f'{{gpu="cpu",le="+Inf",model="{model}"}}'
    assert (after[total] - before.get(total, 0)) - (after[one] - before.get(one, 0)) > 0, \
        "no decoder forward held canvases of more than one edit job"
    for document, view in zip(documents, views, strict=True):
        assert_outside_spans_identical(document, view["result"])
    expected = results_from_engine(stack.model_dir, bodies)
    assert [view["result"]["document"] for view in views] == [e["document"] for e in expected]
    assert [view["result"]["edits"] for view in views] == [e["edits"] for e in expected]


def test_cli_edit_writes_the_file_back_byte_identical_outside_the_span(stack: Stack, tmp_path, capsys):
    from services.cli import main

    original = "first line\r\n\tsecond \u05e9\u05dc\u05d5\u05dd \U0001f600\r\nthird, no newline".encode()
    source = tmp_path / "notes.txt"
    source.write_bytes(original)
    text = original.decode()
    start = text.index("second")
    code = main(["edit", str(source), "--span", f"{start}:{start + 6}", "--max-tokens", "3", "--instruction",
                 "a number word", "--steps", str(STEPS), "--seed", "9", "--url", stack.api_url, "--write"])
    assert code == 0, capsys.readouterr()
    edited = source.read_bytes().decode()
    head, tail = text[:start], text[start + 6:]
    assert edited.startswith(head) and edited.endswith(tail)
    replacement = edited[len(head):len(edited) - len(tail)]
    # --max-tokens 3 with the byte tokenizer: at most three bytes, each decoding to at most one character.
    assert len(replacement) <= 3
    assert "\r\n" in edited and not edited.endswith("\n")
