"""Property tests of the edit invariant: plan → fill the free positions with arbitrary ids → reassemble;
the text outside the spans is byte-identical and every offset points at its replacement."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgtext.edit_result import assemble_edit_result
from dgtext.edits import EditSpec, plan_edits, resolve_edits

# Fragments that stress byte identity: CRLF, tabs, combining marks, emoji (ZWJ, flags, skin tone),
# right-to-left scripts, a lone CR, a missing trailing newline (any document may end without one).
FRAGMENTS = [
    "\r\n", "\n", "\t", " ", "\r", "e\u0301", "\u0301", "\U0001f469\u200d\U0001f4bb", "\U0001f1eb\U0001f1f7",
    "\U0001f44d\U0001f3fd", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\u200f", "def f(x):",
    "    return x", "The quick brown fox", "caf\u00e9", "\u4e2d\u6587", "\x00",
]
DOCUMENTS = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=14).map("".join)


@st.composite
def documents_with_edits(draw: st.DrawFn) -> tuple[str, list[EditSpec]]:
    document = draw(DOCUMENTS)
    cuts = sorted(draw(st.lists(st.integers(0, len(document)), min_size=2, max_size=8)))
    specs: list[EditSpec] = []
    previous_insertion = None
    for start, end in zip(cuts[::2], cuts[1::2], strict=False):
        if start == end == previous_insertion:
            continue  # two insertions at one offset are rejected as overlapping; tested elsewhere
        max_tokens = draw(st.none() | st.integers(0, 5))
        if start == end:
            previous_insertion = start
        specs.append(EditSpec(start=start, end=end, max_tokens=max_tokens))
    if not specs:
        specs.append(EditSpec(start=0, end=len(document), max_tokens=draw(st.none() | st.integers(0, 5))))
    return document, draw(st.permutations(specs))


def _expected_budget(tokenizer, document: str, spec: EditSpec, insertion_tokens: int) -> int:
    if spec.max_tokens is not None:
        return spec.max_tokens
    if spec.start == spec.end:
        return insertion_tokens
    return len(tokenizer.encode(document[spec.start:spec.end]))


def _check_round_trip(tokenizer, document, specs, canvas_length, insertion_tokens, fill) -> None:
    edits = resolve_edits(document, specs)
    plan = plan_edits(document, edits, tokenizer, canvas_length, insertion_tokens)
    filled = []
    for canvas in plan.canvases:
        ids = list(canvas.token_ids)
        for position, fixed in enumerate(canvas.is_fixed):
            if not fixed:
                ids[position] = fill(tokenizer.vocab_size)
        filled.append(ids)
    result = assemble_edit_result(plan, filled, tokenizer)

    # Free ids in text order, cut into spans by the expected budgets (document order).
    free_ids = [ids[p] for canvas, ids in zip(plan.canvases, filled, strict=True)
                for p, fixed in enumerate(canvas.is_fixed) if not fixed]
    edit_of = {e.index: e for e in edits}
    by_position = sorted(edit_of, key=lambda i: (edit_of[i].start, edit_of[i].end))
    budgets = {i: _expected_budget(tokenizer, document, specs[i], insertion_tokens) for i in range(len(specs))}
    assert len(free_ids) == sum(budgets.values())
    empty = {tokenizer.pad_id, *tokenizer.eos_ids}
    expected_document, cursor, offset = "", 0, 0
    for i in by_position:
        edit = edit_of[i]
        span_ids, free_ids = free_ids[:budgets[i]], free_ids[budgets[i]:]
        replacement = tokenizer.decode([t for t in span_ids if t not in empty])
        outcome = result.edits[i]
        assert outcome.index == i and outcome.replacement == replacement
        assert (outcome.original_start, outcome.original_end) == (edit.start, edit.end)
        expected_document += document[cursor:edit.start]
        assert outcome.start == len(expected_document)
        expected_document += replacement
        assert outcome.end == len(expected_document)
        assert result.document[outcome.start:outcome.end] == replacement
        # The text before this span, in the new document, is the old text byte for byte.
        assert result.document[offset:outcome.start].encode() == document[cursor:edit.start].encode()
        cursor, offset = edit.end, outcome.end
    assert result.document[offset:].encode() == document[cursor:].encode()
    assert result.document == expected_document + document[cursor:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=documents_with_edits(), canvas_length=st.integers(1, 12), insertion_tokens=st.integers(0, 4),
       data=st.data())
def test_text_outside_spans_is_byte_identical(any_tokenizer, case, canvas_length, insertion_tokens, data):
    document, specs = case
    fill_ids = st.integers(0, any_tokenizer.vocab_size - 1) | st.sampled_from([0, *any_tokenizer.eos_ids])
    _check_round_trip(any_tokenizer, document, specs, canvas_length, insertion_tokens,
                      lambda _vocab: data.draw(fill_ids))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=documents_with_edits(), canvas_length=st.integers(1, 12), insertion_tokens=st.integers(0, 4))
def test_model_sees_the_document_in_order(bpe_tokenizer, case, canvas_length, insertion_tokens):
    """Prompt + (leading ids + canvas) per canvas is the piecewise tokenisation of the document, with the
    spans' free positions in place, cut only after the last canvas and padded with fixed pad ids."""
    tokenizer = bpe_tokenizer
    document, specs = case
    edits = sorted(resolve_edits(document, specs), key=lambda e: (e.start, e.end))
    plan = plan_edits(document, edits, tokenizer, canvas_length, insertion_tokens)
    expected: list[int | None] = [tokenizer.bos_id]
    cursor = 0
    for edit in edits:
        expected += tokenizer.encode(document[cursor:edit.start])
        budget = _expected_budget(tokenizer, document, specs[edit.index], insertion_tokens)
        expected += [None] * budget
        cursor = edit.end
    expected += tokenizer.encode(document[cursor:])

    seen: list[int | None] = list(plan.prompt_token_ids)
    for canvas in plan.canvases:
        assert len(canvas.token_ids) == len(canvas.is_fixed) == canvas_length
        assert not all(canvas.is_fixed), "a canvas exists only to hold free positions"
        seen += canvas.leading_token_ids
        seen += [t if fixed else None for t, fixed in zip(canvas.token_ids, canvas.is_fixed, strict=True)]
    overflow = len(seen) - len(expected)
    assert overflow < canvas_length
    if overflow > 0:
        assert seen[len(expected):] == [tokenizer.pad_id] * overflow
        seen = seen[:len(expected)]
    assert seen == expected[:len(seen)]
    assert None not in expected[len(seen):], "every free position is in some canvas"
