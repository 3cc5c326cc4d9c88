"""Edit-in-place requests: span validation, token-boundary alignment and canvas planning (issue 4).

Offsets are Unicode code points (Python ``str`` indices) into the document, half-open ``[start, end)``.
A CRLF line ending is two code points; an emoji is one code point (several if it is a ZWJ sequence).

How a document becomes an engine request (the contract ``worker/edit_jobs.py`` relies on):

* **Alignment.** The document is cut at every span edge and each piece (text before the first span, every
  span, every gap between spans, the tail) is tokenised on its own. Token boundaries therefore coincide with
  the span edges exactly, whatever the tokenizer would have merged across them, and the new document is
  assembled from the *original characters* outside the spans (see ``dgtext/edit_result.py``), so the text
  outside the spans comes back byte-identical even for tokenizers whose decode does not round-trip.
* **Replacement length.** Each span gets ``max_tokens`` free positions when the edit sets it, otherwise as
  many as the span's own text has tokens. The model shortens a replacement by leaving positions empty: a
  pad or stop (eos) id at a free position is dropped from the replacement. ``max_tokens=0`` deletes the
  span. An empty span (a pure insertion) has no own length: without ``max_tokens`` it gets
  ``insertion_tokens`` positions (the worker passes the job's ``max_new_tokens``, i.e. the request's value
  or the checkpoint's generation default), and the model leaves unneeded ones empty.
* **Prompt.** Without instructions the prompt is ``[bos] + tokens(text before the first span)``. With
  instructions the prompt is the chat template rendered for one user turn whose content is the instruction
  (several instructions: one numbered line each, in document order), with the generation prompt, followed
  by the tokens of the text before the first span: the document is the model's answer.
* **Canvases.** The token stream ``prefix | span 0 | gap | span 1 | ... | tail`` is cut into canvases of
  ``canvas_length`` positions. The first canvas starts at the first free position (so everything before it
  is in the prompt and the KV cache); a canvas holds free positions for the span(s) in its window and the
  fixed tokens after them, so the model sees both sides, and several spans may share a canvas. The next
  canvas starts at the first free position after the previous canvas's end; the fixed tokens between the
  two become its ``leading_token_ids``. A span longer than the room left in a canvas continues in the next
  canvas. The last canvas is padded with fixed pad ids where the document ends. Text after the last
  canvas is never sent to the model.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dgtext.request_rules import RequestFieldError


class EditTokenizer(Protocol):
    """The part of ``dgtext.tokenizer.PromptTokenizer`` that edit planning uses."""

    pad_id: int
    bos_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]: ...


class EditValidationError(RequestFieldError):
    """An edit request that cannot be planned; ``field`` names the offending part (``edits[2]``, ``document``)."""


@dataclass(frozen=True)
class EditSpec:
    """One requested edit as the client sends it: a span ``[start, end)`` or an exact ``find`` string."""

    start: int | None = None
    end: int | None = None
    find: str | None = None
    instruction: str | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class ResolvedEdit:
    """A validated edit: ``index`` is its position in the request's edit list."""

    index: int
    start: int
    end: int
    instruction: str | None = None
    max_tokens: int | None = None


def find_span(document: str, find: str, field: str) -> tuple[int, int]:
    """The span of ``find`` in ``document``; it must occur exactly once (overlapping occurrences count)."""
    if not find:
        raise EditValidationError(field, "find is empty; give the exact text to replace")
    first = document.find(find)
    if first < 0:
        raise EditValidationError(field, f"find text {find[:40]!r} does not occur in the document")
    second = document.find(find, first + 1)
    if second >= 0:
        raise EditValidationError(
            field,
            f"find text {find[:40]!r} occurs more than once (at {first} and {second}); "
            "make it longer or give start/end",
        )
    return first, first + len(find)


def _resolve_one(document: str, spec: EditSpec, index: int) -> ResolvedEdit:
    field = f"edits[{index}]"
    if spec.find is not None:
        if spec.start is not None or spec.end is not None:
            raise EditValidationError(field, "give either find or start/end, not both")
        start, end = find_span(document, spec.find, field)
    elif spec.start is None or spec.end is None:
        raise EditValidationError(field, "give both start and end (or find)")
    else:
        start, end = spec.start, spec.end
    if start < 0 or end > len(document):
        raise EditValidationError(
            field, f"span [{start}, {end}) is outside the document of {len(document)} characters"
        )
    if start > end:
        raise EditValidationError(field, f"start {start} is after end {end}")
    if spec.max_tokens is not None and spec.max_tokens < 0:
        raise EditValidationError(field, f"max_tokens must be >= 0, got {spec.max_tokens}")
    return ResolvedEdit(index, start, end, spec.instruction, spec.max_tokens)


def resolve_edits(
    document: str, specs: Sequence[EditSpec], max_document_chars: int | None = None
) -> list[ResolvedEdit]:
    """Validate the edits of one document and return them sorted by position.

    Raises ``EditValidationError`` (a ``ValueError``) naming the offending edit for: an empty edit list, a
    document over ``max_document_chars``, a span outside the document or reversed, a ``find`` string that
    occurs zero or several times, and overlapping spans (two insertions at the same offset overlap too).
    """
    if max_document_chars is not None and len(document) > max_document_chars:
        raise EditValidationError(
            "document", f"{len(document)} characters is over the limit of {max_document_chars}"
        )
    if not specs:
        raise EditValidationError("edits", "the edit list is empty; send at least one edit")
    resolved = sorted((_resolve_one(document, spec, i) for i, spec in enumerate(specs)),
                      key=lambda e: (e.start, e.end))
    for before, after in zip(resolved, resolved[1:], strict=False):
        same_insertion_point = before.start == before.end == after.start == after.end
        if after.start < before.end or same_insertion_point:
            raise EditValidationError(
                f"edits[{after.index}]",
                f"span [{after.start}, {after.end}) overlaps edits[{before.index}] "
                f"[{before.start}, {before.end}); merge them into one edit",
            )
    return resolved


@dataclass(frozen=True)
class PlannedCanvas:
    """Torch-free twin of ``engine.types.InfillCanvas``: the worker converts one into the other."""

    leading_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    is_fixed: tuple[bool, ...]


@dataclass(frozen=True)
class SpanPlacement:
    """Where one edit's free positions sit: ``slots`` are ``(canvas index, position)`` in text order."""

    edit: ResolvedEdit
    original_token_count: int
    slots: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class EditPlan:
    """Everything needed to run one document's edits and to assemble the result afterwards."""

    document: str
    prompt_token_ids: tuple[int, ...]
    canvases: tuple[PlannedCanvas, ...]
    spans: tuple[SpanPlacement, ...]  # in document order
    empty_position_ids: frozenset[int]  # pad and stop ids: a free position holding one is dropped
    canvas_length: int


def instruction_text(edits: Sequence[ResolvedEdit]) -> str | None:
    """The user-turn content for the edits' instructions (document order), or None when there are none."""
    instructions = [e.instruction for e in edits if e.instruction]
    if not instructions:
        return None
    if len(instructions) == 1:
        return instructions[0]
    return "\n".join(f"{number}. {text}" for number, text in enumerate(instructions, start=1))


def _prompt_header(edits: Sequence[ResolvedEdit], tokenizer: EditTokenizer) -> list[int]:
    content = instruction_text(edits)
    if content is None:
        return [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return list(tokenizer.encode_prompt(messages=[{"role": "user", "content": content}]))


def replacement_budget(edit: ResolvedEdit, own_token_count: int, insertion_tokens: int) -> int:
    """Free positions for one edit: ``max_tokens`` if set, else the span's own token count; an empty span
    without ``max_tokens`` gets ``insertion_tokens``."""
    if edit.max_tokens is not None:
        return edit.max_tokens
    return own_token_count if edit.start < edit.end else insertion_tokens


def _token_stream(
    document: str, edits: Sequence[ResolvedEdit], tokenizer: EditTokenizer, insertion_tokens: int
) -> tuple[list[tuple[int, int | None]], list[int]]:
    """The document as ``(token id, owning span index or None when fixed)`` items, each piece tokenised
    separately; free items carry the pad id (the engine ignores values at free positions)."""
    stream: list[tuple[int, int | None]] = []
    own_lengths: list[int] = []
    cursor = 0
    for span_index, edit in enumerate(edits):
        stream.extend((t, None) for t in tokenizer.encode(document[cursor:edit.start]))
        own_length = len(tokenizer.encode(document[edit.start:edit.end]))
        own_lengths.append(own_length)
        budget = replacement_budget(edit, own_length, insertion_tokens)
        stream.extend((tokenizer.pad_id, span_index) for _ in range(budget))
        cursor = edit.end
    stream.extend((t, None) for t in tokenizer.encode(document[cursor:]))
    return stream, own_lengths


def plan_edits(
    document: str,
    edits: Sequence[ResolvedEdit],
    tokenizer: EditTokenizer,
    canvas_length: int,
    insertion_tokens: int,
) -> EditPlan:
    """Plan the prompt and clamped canvases for ``edits`` (from ``resolve_edits``: disjoint spans).

    ``insertion_tokens`` sizes empty spans without ``max_tokens``. A plan may have no canvas at all (every
    edit a deletion): the result is then assembled without running the model.
    """
    if canvas_length < 1:
        raise ValueError(f"canvas_length must be positive, got {canvas_length}")
    if insertion_tokens < 0:
        raise ValueError(f"insertion_tokens must be >= 0, got {insertion_tokens}")
    ordered = sorted(edits, key=lambda e: (e.start, e.end))
    stream, own_lengths = _token_stream(document, ordered, tokenizer, insertion_tokens)
    free_indices = [i for i, (_, owner) in enumerate(stream) if owner is not None]
    slots: list[list[tuple[int, int]]] = [[] for _ in ordered]
    canvases: list[PlannedCanvas] = []
    first_free = free_indices[0] if free_indices else len(stream)
    prompt = _prompt_header(ordered, tokenizer) + [t for t, _ in stream[:first_free]]
    canvas_start, previous_end = first_free, first_free
    while canvas_start < len(stream):
        window = stream[canvas_start:canvas_start + canvas_length]
        for offset, (_, owner) in enumerate(window):
            if owner is not None:
                slots[owner].append((len(canvases), offset))
        padding = canvas_length - len(window)
        canvases.append(PlannedCanvas(
            leading_token_ids=tuple(t for t, _ in stream[previous_end:canvas_start]),
            token_ids=tuple(t for t, _ in window) + (tokenizer.pad_id,) * padding,
            is_fixed=tuple(owner is None for _, owner in window) + (True,) * padding,
        ))
        previous_end = canvas_start + canvas_length
        next_free = bisect.bisect_left(free_indices, previous_end)
        canvas_start = free_indices[next_free] if next_free < len(free_indices) else len(stream)
    placements = tuple(
        SpanPlacement(edit, own_lengths[k], tuple(slots[k])) for k, edit in enumerate(ordered)
    )
    return EditPlan(
        document=document,
        prompt_token_ids=tuple(prompt),
        canvases=tuple(canvases),
        spans=placements,
        empty_position_ids=frozenset((tokenizer.pad_id, *tokenizer.eos_ids)),
        canvas_length=canvas_length,
    )


def require_something_to_write(plan: EditPlan) -> None:
    """Raise ``EditValidationError("edits")`` for a plan without any canvas: every edit has a zero-token
    budget, so the model has nothing to write (the API refuses it at submit, the worker before the engine)."""
    if not plan.canvases:
        raise EditValidationError("edits", "every edit has a zero-token budget (max_tokens 0, or an empty span "
                                  "with nothing to insert), so there is nothing for the model to write")
