"""Edit jobs (issue 4): a validated `EditJobCreate` → an infill `EngineRequest`, and the engine's committed
canvases → the stored result.

The planning itself (token-boundary alignment, replacement lengths, prompt format, canvas layout) lives in
`dgtext.edits` and is documented there; this module only converts between the wire schema, the torch-free
plan and the engine's dataclasses. The worker keeps the `PreparedEdit` next to the job while it runs:

    prepared = prepare_edit(job, tokenizer, canvas_length, default_max_new_tokens)
    engine.add_request(prepared.request, request_id=ticket.request_id)   # "{job_id}#{attempt}"
    ... "draft" outputs  → store event "draft" with edit_draft_event(prepared, out, tokenizer)
    ... "canvas" outputs → collect out.token_ids (infill canvases come back whole: canvas_length ids)
    "finished"           → store.succeed(job_id, edit_result(prepared, canvases, out, tokenizer))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dgtext.edit_result import assemble_edit_result, draft_replacements
from dgtext.edits import (
    EditPlan,
    EditSpec,
    EditTokenizer,
    plan_edits,
    require_something_to_write,
    resolve_edits,
)
from engine.types import EngineRequest, InfillCanvas, RequestStats, SamplingParams, StepOutput
from services.schemas import EditJobCreate


@dataclass(frozen=True)
class PreparedEdit:
    """An edit job ready for the engine: the request to add and the plan to assemble its result with."""

    request: EngineRequest
    plan: EditPlan


def plan_for_job(
    job: EditJobCreate, tokenizer: EditTokenizer, canvas_length: int, default_max_new_tokens: int
) -> EditPlan:
    """The dgtext plan of an edit job. An insertion (empty span) without `max_tokens` gets the job's
    `max_new_tokens`, or the checkpoint's default when the job leaves it unset."""
    specs = [EditSpec(e.start, e.end, e.find, e.instruction, e.max_tokens) for e in job.edits]
    edits = resolve_edits(job.document, specs)
    insertion_tokens = job.max_new_tokens if job.max_new_tokens is not None else default_max_new_tokens
    return plan_edits(job.document, edits, tokenizer, canvas_length, insertion_tokens)


def prepare_edit(
    job: EditJobCreate, tokenizer: EditTokenizer, canvas_length: int, default_max_new_tokens: int
) -> PreparedEdit:
    """Plan an edit job and build its engine request; ValueError for a job with nothing to generate."""
    plan = plan_for_job(job, tokenizer, canvas_length, default_max_new_tokens)
    require_something_to_write(plan)
    canvases = tuple(InfillCanvas(c.leading_token_ids, c.token_ids, c.is_fixed) for c in plan.canvases)
    params = SamplingParams(**job.sampling_params())
    request = EngineRequest(prompt_token_ids=plan.prompt_token_ids, params=params, infill=canvases)
    return PreparedEdit(request=request, plan=plan)


def edit_draft_event(prepared: PreparedEdit, out: StepOutput, tokenizer: EditTokenizer) -> dict[str, Any]:
    """Payload of a `draft` event: the current text of each span with free positions in this canvas,
    keyed by the edit's index in the request (as a string: JSON object keys)."""
    drafts = draft_replacements(prepared.plan, out.canvas_index, out.token_ids, tokenizer)
    return {
        "canvas": out.canvas_index,
        "step": out.step,
        "edits": {str(index): text for index, text in sorted(drafts.items())},
    }


def edit_result(
    prepared: PreparedEdit,
    canvas_token_ids: Sequence[Sequence[int]],
    out: StepOutput | None,
    tokenizer: EditTokenizer,
) -> dict[str, Any]:
    """The stored result of a finished edit job (`JobPublic.result` for kind `edit`).

    Raises ValueError when the engine returned a different number of canvases or changed a fixed id.
    """
    assembled = assemble_edit_result(prepared.plan, canvas_token_ids, tokenizer)
    result: dict[str, Any] = {
        "document": assembled.document,
        "edits": [
            {
                "index": e.index,
                "start": e.start,
                "end": e.end,
                "original_start": e.original_start,
                "original_end": e.original_end,
                "replacement": e.replacement,
                "tokens": len(e.token_ids),
            }
            for e in assembled.edits
        ],
        "diff": assembled.diff,
        "finish_reason": (out.finish_reason if out is not None else None) or "stop",
    }
    if out is not None and out.stats is not None:
        result["usage"] = usage_of(out.stats)
    return result


def usage_of(stats: RequestStats) -> dict[str, Any]:
    """The `usage` of a stored result (generate and edit alike), from the engine's request stats."""
    return {"prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
            "canvases": stats.canvases, "denoising_steps": stats.denoising_steps,
            "steps_per_canvas": stats.steps_per_canvas}
