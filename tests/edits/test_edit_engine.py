"""Edit plans through the real engine (tiny random checkpoint on CPU): clamped positions come back unchanged,
whole canvases are returned, the result assembles, and edits of several documents batch together."""

from __future__ import annotations

import pytest
import torch

from dgtext.edit_result import assemble_edit_result, draft_replacements
from dgtext.edits import EditSpec, plan_edits, resolve_edits
from engine import Engine
from engine.types import EngineRequest, InfillCanvas, SamplingParams
from tests.support.checkpoints import write_tiny_checkpoint

STEPS = 3  # denoising steps per canvas: enough to exercise clamping, cheap on two shared CPU cores


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_edit_ckpt"), seed=3)
    return Engine.from_pretrained(folder, device="cpu", dtype=torch.float32, max_canvases_in_flight=8)


def _request(plan, seed: int, **params) -> EngineRequest:
    canvases = tuple(InfillCanvas(c.leading_token_ids, c.token_ids, c.is_fixed) for c in plan.canvases)
    sampling = SamplingParams(seed=seed, max_denoising_steps=STEPS, **params)
    return EngineRequest(prompt_token_ids=plan.prompt_token_ids, params=sampling, infill=canvases)


def _run(engine: Engine, requests: dict[str, EngineRequest], max_steps: int = 500):
    """Drive the engine until every request finished; outputs grouped per request id."""
    names = list(requests)
    outputs: dict[str, list] = {name: [] for name in names}
    # generate() numbers the requests "0", "1", ... in order; map them back to the caller's names.
    engine.generate(list(requests.values()), max_steps=max_steps,
                    on_output=lambda out: outputs[names[int(out.request_id)]].append(out))
    return outputs


def _plan(engine: Engine, document: str, specs: list[EditSpec]):
    canvas_length = engine.config.canvas_length
    return plan_edits(document, resolve_edits(document, specs), engine.tokenizer, canvas_length,
                      insertion_tokens=4)


def test_clamped_positions_survive_and_the_result_assembles(engine):
    tokenizer, canvas_length = engine.tokenizer, engine.config.canvas_length
    # Long enough for three canvases of the tiny preset; a literal "<eos>" in the text is a fixed stop id
    # inside a canvas, which must not end an infill request.
    document = "head\r\n" + "\tx = f(a) <eos> \U0001f600 \u05e9\u05dc\u05d5\u05dd\n" * 6 + "tail"
    specs = [EditSpec(find="head"), EditSpec(start=40, end=44), EditSpec(start=len(document) - 2,
                                                                             end=len(document) - 2)]
    plan = _plan(engine, document, specs)
    assert len(plan.canvases) >= 2 and any(c.leading_token_ids for c in plan.canvases[1:])
    outputs = _run(engine, {"doc": _request(plan, seed=11, stream_drafts=True, max_new_tokens=1)})["doc"]

    canvases = [out.token_ids for out in outputs if out.kind == "canvas"]
    drafts = [out for out in outputs if out.kind == "draft"]
    finished = [out for out in outputs if out.kind == "finished"]
    assert len(finished) == 1 and finished[0].finish_reason == "stop"
    assert len(canvases) == len(plan.canvases)
    for planned, committed in zip(plan.canvases, canvases, strict=True):
        assert len(committed) == canvas_length
        assert all(got == want for got, want, fixed in zip(committed, planned.token_ids, planned.is_fixed,
                                                            strict=True) if fixed)
    assert drafts and all(len(d.token_ids) == canvas_length for d in drafts)
    assert set(draft_replacements(plan, drafts[0].canvas_index, drafts[0].token_ids, tokenizer)) <= {0, 1, 2}

    result = assemble_edit_result(plan, canvases, tokenizer)
    pieces = sorted(result.edits, key=lambda e: e.original_start)
    cursor_old, cursor_new = 0, 0
    for edit in pieces:
        assert result.document[cursor_new:edit.start] == document[cursor_old:edit.original_start]
        cursor_old, cursor_new = edit.original_end, edit.end
    assert result.document[cursor_new:] == document[cursor_old:]


def test_edits_of_several_documents_batch_and_match_running_alone(engine):
    documents = [f"document {k}: the {'quick ' * k}brown fox\n\tjumps over {k} dogs" for k in range(4)]
    plans = {f"doc{k}": _plan(engine, doc, [EditSpec(find="brown"), EditSpec(find="dogs")])
             for k, doc in enumerate(documents)}
    together = _run(engine, {rid: _request(plan, seed=100 + i) for i, (rid, plan) in enumerate(plans.items())})
    alone = _run(engine, {"doc2": _request(plans["doc2"], seed=102)})["doc2"]

    results = {}
    for request_id, plan in plans.items():
        canvases = [out.token_ids for out in together[request_id] if out.kind == "canvas"]
        results[request_id] = assemble_edit_result(plan, canvases, engine.tokenizer)
        document = plan.document
        assert results[request_id].document.startswith(document[:document.index("brown")])
        assert results[request_id].document.endswith(results[request_id].edits[1].replacement)
    alone_canvases = [out.token_ids for out in alone if out.kind == "canvas"]
    together_canvases = [out.token_ids for out in together["doc2"] if out.kind == "canvas"]
    assert alone_canvases == together_canvases, "a seeded edit must not depend on what it is batched with"


def test_the_model_sees_both_sides_and_the_text_between_canvases(engine):
    """Changing the text before a span (prompt / KV cache), after it (fixed canvas positions) or between two
    canvases (leading ids) changes what the model writes into the span."""
    canvas_length = engine.config.canvas_length
    gap = "m" * (2 * canvas_length)  # pushes the second span into its own canvas, after leading text

    def free_ids(document: str, seed: int = 5) -> list[list[int]]:
        specs = [EditSpec(find="<one>"), EditSpec(find="<two>", max_tokens=8)]
        plan = _plan(engine, document, specs)
        out = _run(engine, {"probe": _request(plan, seed=seed)})["probe"]
        canvases = [o.token_ids for o in out if o.kind == "canvas"]
        return [[canvases[c][p] for c, p in span.slots] for span in plan.spans]

    base = free_ids(f"before <one> after {gap} between <two> end")
    assert len(base[0]) == len("<one>") and len(base[1]) == 8
    assert free_ids(f"before <one> after {gap} between <two> end") == base  # deterministic for a seed
    assert free_ids(f"BEFORE <one> after {gap} between <two> end")[0] != base[0]
    assert free_ids(f"before <one> AFTER {gap} between <two> end")[0] != base[0]
    assert free_ids(f"before <one> after {gap} BETWEEN <two> end")[1] != base[1]
