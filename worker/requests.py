"""Job kinds: a validated wire request → what the engine runs and how its outputs become events and results.

`prepare_job(job_request, model)` is the one entry point. Each kind has a preparer in `JOB_PREPARERS`
(`generate` here, `edit` through `worker.edit_jobs`). A preparer raises ValueError (pydantic's
ValidationError is one) for input the engine cannot run; the worker turns that into a failed job with the
message, never a crashed worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dgtext.edits import EditTokenizer
from engine.types import EngineRequest, SamplingParams, StepOutput
from services.schemas import EditJobCreate, GenerateJobCreate, parse_job_create
from worker.edit_jobs import edit_draft_event, edit_result, prepare_edit, usage_of


@dataclass(frozen=True)
class ModelInfo:
    """What job preparation needs to know about the loaded model."""

    tokenizer: EditTokenizer  # dgtext.tokenizer.PromptTokenizer
    canvas_length: int
    default_max_new_tokens: int


@dataclass(frozen=True)
class PreparedJob:
    """A job ready for the engine: its request, and how to report its drafts and its result.

    `draft_event(out)` / `canvas_event(out)` give the data of a `draft` / `canvas` event;
    `result(canvas_token_ids, finished_out)` gives the stored result (may raise ValueError).
    """

    request: EngineRequest
    draft_event: Callable[[StepOutput], dict[str, Any]]
    canvas_event: Callable[[StepOutput], dict[str, Any]]
    result: Callable[[Sequence[Sequence[int]], StepOutput], dict[str, Any]]


def _text_event(out: StepOutput) -> dict[str, Any]:
    return {"canvas": out.canvas_index, "step": out.step, "text": out.text}


def prepare_generate(job: GenerateJobCreate, model: ModelInfo) -> PreparedJob:
    """A generate job: prompt or chat messages, sampler options (unset ones left to the model's defaults)."""
    params = SamplingParams(**job.sampling_params())
    if job.messages is not None:
        request = EngineRequest(messages=[m.model_dump() for m in job.messages], params=params)
    else:
        request = EngineRequest(prompt=job.prompt, params=params)

    def result(canvas_token_ids: Sequence[Sequence[int]], out: StepOutput) -> dict[str, Any]:
        # Decode all ids at once: a multi-byte character may straddle two canvases.
        all_ids = [token for canvas in canvas_token_ids for token in canvas]
        return {"text": model.tokenizer.decode(all_ids), "finish_reason": out.finish_reason or "stop",
                "usage": {} if out.stats is None else usage_of(out.stats), "token_ids": all_ids}

    return PreparedJob(request=request, draft_event=_text_event, canvas_event=_text_event, result=result)


def prepare_edit_job(job: EditJobCreate, model: ModelInfo) -> PreparedJob:
    """An edit job (issue 4): planned by `worker.edit_jobs.prepare_edit`."""
    prepared = prepare_edit(job, model.tokenizer, model.canvas_length, model.default_max_new_tokens)
    return PreparedJob(
        request=prepared.request,
        draft_event=lambda out: edit_draft_event(prepared, out, model.tokenizer),
        canvas_event=lambda out: {"canvas": out.canvas_index, "step": out.step},
        result=lambda canvases, out: edit_result(prepared, canvases, out, model.tokenizer),
    )


JobPreparer = Callable[[Any, ModelInfo], PreparedJob]
JOB_PREPARERS: dict[str, JobPreparer] = {"generate": prepare_generate, "edit": prepare_edit_job}


def prepare_job(job: GenerateJobCreate | EditJobCreate | dict[str, Any], model: ModelInfo) -> PreparedJob:
    """The prepared job of a validated wire request (`JobRecord.request`) or of a raw stored payload."""
    if isinstance(job, dict):
        job = parse_job_create(job)
    preparer = JOB_PREPARERS.get(job.kind)
    if preparer is None:
        raise ValueError(f"this worker cannot run jobs of kind {job.kind!r} (knows {sorted(JOB_PREPARERS)})")
    return preparer(job, model)
