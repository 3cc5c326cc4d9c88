"""Deterministic edit planning cases: shared canvases, long documents, spill-over, padding, prompt format,
replacement lengths, dropped empty positions, drafts, the unified diff and the worker's request builder."""

from __future__ import annotations

import pytest

from dgtext.edit_result import assemble_edit_result, draft_replacements, unified_diff
from dgtext.edits import EditSpec, plan_edits, resolve_edits
from engine.types import InfillCanvas
from services.schemas import EditJobCreate
from worker.edit_jobs import edit_result, prepare_edit


def _plan(tokenizer, document, specs, canvas_length=8, insertion_tokens=3):
    return plan_edits(document, resolve_edits(document, specs), tokenizer, canvas_length, insertion_tokens)


def _fill(plan, token_ids_by_span):
    """Committed canvases whose free positions hold the given ids, span by span in document order."""
    queue = [list(ids) for ids in token_ids_by_span]
    canvases = [list(c.token_ids) for c in plan.canvases]
    for placement, ids in zip(plan.spans, queue, strict=True):
        assert len(ids) == len(placement.slots)
        for (canvas, position), token in zip(placement.slots, ids, strict=True):
            canvases[canvas][position] = token
    return canvases


def test_two_spans_share_a_canvas_with_text_on_both_sides(byte_tokenizer):
    tok = byte_tokenizer
    doc = "ab[cd]ef[g]hij"
    plan = _plan(tok, doc, [EditSpec(start=3, end=5), EditSpec(start=9, end=10)], canvas_length=12)
    assert plan.prompt_token_ids == (tok.bos_id, *tok.encode("ab["))
    (canvas,) = plan.canvases
    assert canvas.leading_token_ids == ()
    assert canvas.is_fixed == (False, False, True, True, True, True, False, True, True, True, True, True)
    assert canvas.token_ids[2:6] == tuple(tok.encode("]ef["))
    assert canvas.token_ids[7:11] == tuple(tok.encode("]hij"))
    assert canvas.token_ids[11] == tok.pad_id  # document ends inside the canvas: fixed pad
    result = assemble_edit_result(plan, _fill(plan, [tok.encode("XY"), tok.encode("Z")]), tok)
    assert result.document == "ab[XY]ef[Z]hij"


def test_long_document_uses_leading_ids_between_canvases(byte_tokenizer):
    tok = byte_tokenizer
    doc = "0123456789" * 5
    plan = _plan(tok, doc, [EditSpec(start=2, end=4), EditSpec(start=30, end=31)], canvas_length=6)
    first, second = plan.canvases
    assert plan.prompt_token_ids == (tok.bos_id, *tok.encode("01"))
    assert first.token_ids[2:] == tuple(tok.encode("4567"))
    assert second.leading_token_ids == tuple(tok.encode(doc[8:30]))  # text between the two canvases
    assert second.token_ids[1:] == tuple(tok.encode(doc[31:36]))
    result = assemble_edit_result(plan, _fill(plan, [tok.encode("ab"), tok.encode("c")]), tok)
    assert result.document == doc[:2] + "ab" + doc[4:30] + "c" + doc[31:]
    assert [(e.start, e.end) for e in result.edits] == [(2, 4), (30, 31)]


def test_span_longer_than_a_canvas_continues_in_the_next(byte_tokenizer):
    tok = byte_tokenizer
    doc = "<" + "x" * 10 + ">tail"
    plan = _plan(tok, doc, [EditSpec(start=1, end=11)], canvas_length=4)
    assert len(plan.canvases) == 3
    assert [c.leading_token_ids for c in plan.canvases] == [(), (), ()]
    assert plan.canvases[2].is_fixed == (False, False, True, True)
    result = assemble_edit_result(plan, _fill(plan, [tok.encode("0123456789")]), tok)
    assert result.document == "<0123456789>tail"


def test_replacement_budget_rules(bpe_tokenizer):
    tok = bpe_tokenizer
    doc = "def add(a, b):\n\treturn a + b\n"
    specs = [EditSpec(find="add"), EditSpec(find="return", max_tokens=5), EditSpec(start=len(doc), end=len(doc))]
    plan = _plan(tok, doc, specs, canvas_length=64, insertion_tokens=7)
    budgets = {p.edit.index: len(p.slots) for p in plan.spans}
    assert budgets == {0: len(tok.encode("add")), 1: 5, 2: 7}
    assert {p.edit.index: p.original_token_count for p in plan.spans}[1] == len(tok.encode("return"))


def test_pad_and_stop_ids_inside_a_span_are_dropped(byte_tokenizer):
    tok = byte_tokenizer
    doc = "say [hello] now"
    plan = _plan(tok, doc, [EditSpec(find="hello", max_tokens=6)])
    h, i = tok.encode("hi")
    filled = _fill(plan, [[tok.pad_id, h, tok.eos_ids[0], i, tok.eos_ids[-1], tok.pad_id]])
    result = assemble_edit_result(plan, filled, tok)
    assert result.document == "say [hi] now"
    assert result.edits[0].token_ids == (h, i)
    assert (result.edits[0].start, result.edits[0].end) == (5, 7)


def test_instructions_go_into_one_user_turn(byte_tokenizer):
    tok = byte_tokenizer
    doc = "one two three"
    specs = [EditSpec(find="three", instruction="make it a number"), EditSpec(find="one", instruction="capitalise")]
    plan = _plan(tok, doc, specs, canvas_length=16)
    header = tok.encode_prompt(messages=[{"role": "user", "content": "1. capitalise\n2. make it a number"}])
    assert plan.prompt_token_ids == (*header, *tok.encode(""))
    assert tok.decode(list(plan.prompt_token_ids), skip_special_tokens=False).endswith("<|turn>model\n")


def test_engine_changing_a_fixed_id_is_an_error(byte_tokenizer):
    tok = byte_tokenizer
    plan = _plan(tok, "abc def", [EditSpec(find="abc")])
    filled = _fill(plan, [tok.encode("xyz")])
    filled[0][4] = tok.encode("Q")[0]
    with pytest.raises(ValueError, match="fixed id"):
        assemble_edit_result(plan, filled, tok)
    with pytest.raises(ValueError, match="expected 8 ids"):
        assemble_edit_result(plan, [row[:7] for row in filled], tok)


def test_drafts_show_each_span_of_the_canvas(byte_tokenizer):
    tok = byte_tokenizer
    plan = _plan(tok, "a(bc)d(e)f", [EditSpec(start=2, end=4), EditSpec(start=7, end=8)], canvas_length=16)
    draft = _fill(plan, [tok.encode("XY"), [tok.pad_id]])[0]
    assert draft_replacements(plan, 0, draft, tok) == {0: "XY", 1: ""}


def test_unified_diff_keeps_crlf_and_marks_missing_newline():
    old = "line one\r\nline two\r\nlast"
    new = "line one\r\nline 2\r\nlast"
    diff = unified_diff(old, new, "notes.txt")
    assert diff.startswith("--- a/notes.txt\n+++ b/notes.txt\n")
    assert "-line two\r\n+line 2\r\n" in diff
    assert diff.endswith(" last\n\\ No newline at end of file\n")
    assert unified_diff(old, old) == ""


def test_prepare_edit_builds_an_infill_request(byte_tokenizer):
    tok = byte_tokenizer
    job = EditJobCreate(document="x = compute(a, b)\n", edits=[{"find": "compute"}, {"start": 18, "end": 18}],
                        seed=7, max_denoising_steps=3)
    prepared = prepare_edit(job, tok, canvas_length=32, default_max_new_tokens=5)
    request = prepared.request
    assert request.prompt_token_ids == (tok.bos_id, *tok.encode("x = "))
    assert request.params.seed == 7 and request.params.max_denoising_steps == 3
    assert all(isinstance(c, InfillCanvas) for c in request.infill)
    assert [len(p.slots) for p in prepared.plan.spans] == [len("compute"), 5]  # insertion: default budget
    filled = _fill(prepared.plan, [tok.encode("combine"), tok.encode("#ok") + [tok.pad_id] * 2])
    result = edit_result(prepared, filled, None, tok)
    assert result["document"] == "x = combine(a, b)\n#ok"
    assert result["edits"][1] == {"index": 1, "start": 18, "end": 21, "original_start": 18, "original_end": 18,
                                  "replacement": "#ok", "tokens": 3}
    assert "+x = combine(a, b)" in result["diff"]
