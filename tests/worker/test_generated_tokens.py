"""`usage.generated_tokens` and `dgserve_generated_tokens_total` count the tokens the model wrote: for an edit job
the replacements, never the fixed text the engine's canvases carry around a span."""

from __future__ import annotations

from dgtext.tokenizer import PromptTokenizer
from engine.types import RequestStats, StepOutput
from services.schemas import EditJobCreate, GenerateJobCreate
from services.settings import BUNDLED_MODEL_DIR
from worker.device import card_label
from worker.metrics import MetricLabels, WorkerMetrics
from worker.requests import ModelInfo, prepare_job


def test_an_edit_counts_only_the_tokens_written_into_its_span():
    tokenizer = PromptTokenizer.from_dir(BUNDLED_MODEL_DIR)
    document = "def area(width, height):\n    return width * height\n\nprint(area(2, 3))\n"
    job = EditJobCreate(document=document, edits=[{"find": "width * height", "max_tokens": 6}])
    prepared = prepare_job(job, ModelInfo(tokenizer, canvas_length=32, default_max_new_tokens=32))
    empty = tokenizer.pad_id
    written = tokenizer.encode(" w*h")[:3]
    canvases = []
    for canvas in prepared.request.infill:
        free = iter([*written, empty, empty, empty, empty, empty, empty])
        canvases.append(tuple(t if fixed else next(free) for t, fixed in zip(canvas.token_ids, canvas.is_fixed, strict=True)))
    assert len(canvases) == 1 and sum(not fixed for fixed in prepared.request.infill[0].is_fixed) == 6
    canvas_out = StepOutput("r", "canvas", 0, 5, canvases[0])
    metrics = WorkerMetrics(MetricLabels(model="dgtiny", gpu="node-a/0"))
    metrics.observe_canvas("edit", prepared.produced_tokens(canvas_out), canvas_out.step)
    # What the engine reports: whole canvases, 32 ids of which 29 were fixed text or left empty.
    stats = RequestStats(prompt_tokens=40, generated_tokens=32, canvases=1, denoising_steps=5, steps_per_canvas=5.0,
                         queue_seconds=0.0, prefill_seconds=0.0, run_seconds=0.1)
    finished = StepOutput("r", "finished", 0, 5, (), finish_reason="stop", stats=stats)
    result = prepared.result(canvases, finished)
    assert result["edits"][0]["tokens"] == len(written)
    assert result["usage"]["generated_tokens"] == len(written)
    counted = metrics.generated_tokens.labels(model="dgtiny", gpu="node-a/0", kind="edit")._value.get()
    assert counted == len(written)


def test_a_generate_canvas_counts_its_committed_ids():
    tokenizer = PromptTokenizer.from_dir(BUNDLED_MODEL_DIR)
    prepared = prepare_job(GenerateJobCreate(prompt="x = "), ModelInfo(tokenizer, 32, 32))
    assert prepared.produced_tokens(StepOutput("r", "canvas", 0, 3, (5, 6, 7))) == 3


def test_gpu_labels_are_unique_per_card_across_nodes():
    labels = {card_label("node-a", "0", "3b2f0c1e-aaaa"), card_label("node-b", "0", "9c1d7e2f-bbbb"),
              card_label("node-a", "0", "GPU-77aa"), card_label("node-c", "0", None), card_label("node-d", "0", None)}
    assert len(labels) == 5  # every pod runs --gpu 0, yet no two cards share a label
    assert card_label("node-a", "0", "3b2f") == "node-a/GPU-3b2f" and card_label("n", "1", None) == "n/1"
