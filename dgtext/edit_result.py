"""Turning the engine's committed infill canvases back into an edited document (issue 4).

The new document is built from the original characters outside the spans and the decoded free positions
inside them, so text outside the spans is byte-identical by construction; the fixed positions the engine
returns are still checked against the plan, because a changed fixed id means the model saw (and committed
to its cache) a different context than the one planned.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from dgtext.edits import EditPlan, EditTokenizer, SpanPlacement


@dataclass(frozen=True)
class EditOutcome:
    """One edit's result. ``[start, end)`` are offsets in the new document, in code points."""

    index: int  # position in the request's edit list
    original_start: int
    original_end: int
    start: int
    end: int
    replacement: str
    token_ids: tuple[int, ...]  # kept ids: empty positions (pad / stop ids) dropped


@dataclass(frozen=True)
class EditResult:
    document: str
    edits: tuple[EditOutcome, ...]  # in request order
    diff: str  # unified diff of the old vs the new document


def check_committed_canvases(plan: EditPlan, canvas_token_ids: Sequence[Sequence[int]]) -> None:
    """Raise ValueError unless there is one full-length canvas per planned canvas with the fixed ids intact."""
    if len(canvas_token_ids) != len(plan.canvases):
        raise ValueError(f"expected {len(plan.canvases)} committed canvases, got {len(canvas_token_ids)}")
    for k, (planned, committed) in enumerate(zip(plan.canvases, canvas_token_ids, strict=True)):
        if len(committed) != plan.canvas_length:
            raise ValueError(
                f"canvas {k}: expected {plan.canvas_length} ids (infill canvases are returned whole), "
                f"got {len(committed)}"
            )
        for position, (fixed, wanted, got) in enumerate(zip(planned.is_fixed, planned.token_ids, committed, strict=True)):
            if fixed and wanted != got:
                raise ValueError(f"canvas {k} position {position}: fixed id {wanted} came back as {got}")


def _span_ids(placement: SpanPlacement, canvas_token_ids: Sequence[Sequence[int]]) -> list[int]:
    return [canvas_token_ids[canvas][position] for canvas, position in placement.slots]


def _replacement(plan: EditPlan, ids: Sequence[int], tokenizer: EditTokenizer) -> tuple[tuple[int, ...], str]:
    kept = tuple(t for t in ids if t not in plan.empty_position_ids)
    return kept, tokenizer.decode(list(kept), skip_special_tokens=True)


def assemble_edit_result(
    plan: EditPlan,
    canvas_token_ids: Sequence[Sequence[int]],
    tokenizer: EditTokenizer,
    filename: str = "document",
) -> EditResult:
    """The edited document from the committed canvases (one ``canvas_length`` id list per planned canvas)."""
    check_committed_canvases(plan, canvas_token_ids)
    pieces: list[str] = []
    outcomes: list[EditOutcome] = []
    cursor = 0
    new_length = 0
    for placement in plan.spans:
        edit = placement.edit
        unchanged = plan.document[cursor:edit.start]
        kept, text = _replacement(plan, _span_ids(placement, canvas_token_ids), tokenizer)
        pieces += [unchanged, text]
        new_start = new_length + len(unchanged)
        new_length = new_start + len(text)
        outcomes.append(EditOutcome(edit.index, edit.start, edit.end, new_start, new_length, text, kept))
        cursor = edit.end
    pieces.append(plan.document[cursor:])
    new_document = "".join(pieces)
    outcomes.sort(key=lambda o: o.index)
    return EditResult(new_document, tuple(outcomes), unified_diff(plan.document, new_document, filename))


def draft_replacements(
    plan: EditPlan, canvas_index: int, draft_token_ids: Sequence[int], tokenizer: EditTokenizer
) -> dict[int, str]:
    """Draft text per edit index for the spans with free positions in one canvas (for streaming).

    A span that continues into another canvas shows only the part in this canvas.
    """
    if len(draft_token_ids) != plan.canvas_length:
        raise ValueError(f"a draft canvas has {plan.canvas_length} ids, got {len(draft_token_ids)}")
    drafts: dict[int, str] = {}
    for placement in plan.spans:
        ids = [draft_token_ids[position] for canvas, position in placement.slots if canvas == canvas_index]
        if ids:
            drafts[placement.edit.index] = _replacement(plan, ids, tokenizer)[1]
    return drafts


def _lines_keeping_ends(text: str) -> list[str]:
    # Split on "\n" only: str.splitlines would also split on \r, \x0b, \x1c, U+2028 ... and so misplace
    # CRLF documents and unusual separators; a "\r" stays part of its line.
    lines = text.split("\n")
    with_ends = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        with_ends.append(lines[-1])
    return with_ends


def unified_diff(old: str, new: str, filename: str = "document") -> str:
    """``difflib`` unified diff of two documents; a last line without a newline is marked the way
    ``diff -u`` marks it (``\\ No newline at end of file``). Empty when the documents are equal."""
    out: list[str] = []
    diff_lines = difflib.unified_diff(
        _lines_keeping_ends(old), _lines_keeping_ends(new), fromfile=f"a/{filename}", tofile=f"b/{filename}"
    )
    for line in diff_lines:
        if line.endswith("\n"):
            out.append(line)
        else:
            out.append(line + "\n\\ No newline at end of file\n")
    return "".join(out)
