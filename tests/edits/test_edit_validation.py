"""Bad edit input: dgtext's resolve_edits (used again by the worker) names the offending edit, and agrees with
the API schema (`services.schemas.EditJobCreate`) on every case. The HTTP 422 responses themselves are tested
with the API (tests/services)."""

from __future__ import annotations

import pydantic
import pytest

from dgtext.edits import EditSpec, EditValidationError, find_span, resolve_edits
from services.schemas import EditJobCreate

DOC = "alpha beta gamma beta\r\n\tend"

BAD_CASES = [
    pytest.param([EditSpec(start=0, end=5), EditSpec(start=3, end=8)], "edits[1]", "overlaps", id="overlap"),
    pytest.param([EditSpec(start=6, end=10), EditSpec(start=0, end=8)], "edits[0]", "overlaps", id="overlap-unsorted"),
    pytest.param([EditSpec(start=4, end=4), EditSpec(start=4, end=4)], "edits[1]", "overlaps", id="same-insertion"),
    pytest.param([EditSpec(start=0, end=len(DOC) + 1)], "edits[0]", "outside the document", id="past-end"),
    pytest.param([EditSpec(start=0, end=2), EditSpec(start=9, end=3)], "edits[1]", "after end", id="reversed"),
    pytest.param([EditSpec(find="delta")], "edits[0]", "does not occur", id="find-missing"),
    pytest.param([EditSpec(start=0, end=1), EditSpec(find="beta")], "edits[1]", "more than once", id="find-twice"),
    pytest.param([EditSpec(start=0, end=1, find="alpha")], "edits[0]", "not both", id="find-and-span"),
]


@pytest.mark.parametrize(("specs", "field", "words"), BAD_CASES)
def test_resolve_edits_names_the_offending_edit(specs, field, words):
    with pytest.raises(EditValidationError) as caught:
        resolve_edits(DOC, specs)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert words in str(caught.value)


@pytest.mark.parametrize(("specs", "field", "words"), BAD_CASES)
def test_api_schema_rejects_the_same_edit(specs, field, words):
    edits = [{k: v for k, v in vars(spec).items() if v is not None} for spec in specs]
    with pytest.raises(pydantic.ValidationError) as caught:
        EditJobCreate(document=DOC, edits=edits)
    assert field in str(caught.value)


def test_empty_edit_list_and_document_limit():
    with pytest.raises(EditValidationError, match=r"^edits: the edit list is empty"):
        resolve_edits(DOC, [])
    with pytest.raises(EditValidationError, match=r"^document: 27 characters is over the limit of 10"):
        resolve_edits(DOC, [EditSpec(start=0, end=1)], max_document_chars=10)


def test_find_counts_overlapping_occurrences():
    with pytest.raises(EditValidationError, match="more than once"):
        find_span("aaa", "aa", "edits[0]")
    assert find_span("x\u0301y \U0001f600", "\U0001f600", "edits[0]") == (4, 5)


def test_valid_edits_come_back_sorted_with_request_indices():
    resolved = resolve_edits(DOC, [EditSpec(find="gamma", instruction="rename"), EditSpec(start=0, end=5),
                                   EditSpec(start=5, end=5, max_tokens=2)])
    assert [(e.index, e.start, e.end) for e in resolved] == [(1, 0, 5), (2, 5, 5), (0, 11, 16)]
    assert resolved[2].instruction == "rename"
