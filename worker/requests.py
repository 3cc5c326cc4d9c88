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
from dgtext.stops import cut_at_stop, ids_within
from engine.types import EngineRequest, SamplingParams, StepOutput
from services.schemas import EditJobCreate, GenerateJobCreate, parse_job_create
from worker.edit_jobs import edit_draft_event, edit_produced_tokens, edit_result, prepare_edit, usage_of
from worker.sampling import sampling_params_of


@dataclass(frozen=True)
class ModelInfo:
    """What job preparation needs to know about the loaded model."""

    tokenizer: EditTokenizer  # dgtext.tokenizer.PromptTokenizer implements it
    canvas_length: int
    default_max_new_tokens: int


@dataclass(frozen=True)
class PreparedJob:
    """A job ready for the engine: its request, and how to report its drafts and its result.

    `draft_event(out)` / `canvas_event(out)` give the data of a `draft` / `canvas` event (the engine's
    outputs carry ids only: text is decoded here, at the edge);
    `result(canvas_token_ids, finished_out)` gives the stored result (may raise ValueError);
    `produced_tokens(canvas_out)` counts the tokens the model wrote in a committed canvas (metrics).
    """

    request: EngineRequest
    draft_event: Callable[[StepOutput], dict[str, Any]]
    canvas_event: Callable[[StepOutput], dict[str, Any]]
    result: Callable[[Sequence[Sequence[int]], StepOutput], dict[str, Any]]
    produced_tokens: Callable[[StepOutput], int] = lambda out: len(out.token_ids)  # open-ended: pads stripped
    # Called after each committed canvas with all committed ids so far: True ends the request now with
    # finish_reason "stop" (a stop string occurred; the engine loop aborts it and stores the result).
    stop_reached: Callable[[Sequence[Sequence[int]]], bool] = lambda canvases: False
    # Called on the engine loop's thread for each committed canvas, before `result` can be called (the
    # events above are made later, on the writer thread): what the result needs beyond the ids (logprobs).
    record_canvas: Callable[[StepOutput], None] = lambda out: None


def _engine_request(job: GenerateJobCreate, params: SamplingParams) -> EngineRequest:
    if job.messages is not None:
        return EngineRequest(messages=[m.model_dump() for m in job.messages], params=params)
    if job.prompt_token_ids is not None:
        return EngineRequest(prompt_token_ids=tuple(job.prompt_token_ids), params=params)
    return EngineRequest(prompt=job.prompt, params=params)


def _prompt_token_count(job: GenerateJobCreate, tokenizer: Any) -> int:
    if job.prompt_token_ids is not None:
        return len(job.prompt_token_ids)
    messages = None if job.messages is None else [m.model_dump() for m in job.messages]
    return len(tokenizer.encode_prompt(job.prompt, messages))


def _pair(alternative: Any) -> tuple[int, float]:
    if hasattr(alternative, "token_id"):
        return int(alternative.token_id), float(alternative.logprob)
    token_id, logprob = alternative
    return int(token_id), float(logprob)


def logprob_entries(out: StepOutput, decode: Callable[[Sequence[int]], str]) -> list[dict[str, Any]]:
    """The committed canvas's per-token log-probabilities (`out.logprobs`, under the final denoising step's
    distribution) as stored in a result: `{"token_id", "token", "logprob", "top": [same, ...]}` per token."""
    entries = []
    for entry in getattr(out, "logprobs", None) or ():
        top = [_pair(alternative) for alternative in entry.top]
        entries.append({"token_id": int(entry.token_id), "token": decode([entry.token_id]),
                        "logprob": float(entry.logprob),
                        "top": [{"token_id": t, "token": decode([t]), "logprob": lp} for t, lp in top]})
    return entries


def prepare_generate(job: GenerateJobCreate, model: ModelInfo) -> PreparedJob:
    """A generate job: prompt, chat messages or token ids, sampler options (unset ones left to the model's
    defaults) and stop strings (the text is cut before the first one and the request ends there)."""
    request = _engine_request(job, sampling_params_of(job.sampling_params()))
    decode = model.tokenizer.decode

    def token_text(ids: Sequence[int]) -> str:  # logprob entries name special tokens too (`<pad>`)
        return model.tokenizer.decode(ids, skip_special_tokens=False)
    logprobs: list[dict[str, Any]] = []  # per committed token, collected canvas by canvas (one attempt)

    def text_event(out: StepOutput) -> dict[str, Any]:
        return {"canvas": out.canvas_index, "step": out.step, "text": decode(out.token_ids)}

    def record_canvas(out: StepOutput) -> None:
        if job.logprobs is not None:
            logprobs.extend(logprob_entries(out, token_text))

    def result(canvas_token_ids: Sequence[Sequence[int]], out: StepOutput) -> dict[str, Any]:
        # Decode all ids at once: a multi-byte character may straddle two canvases.
        all_ids = [token for canvas in canvas_token_ids for token in canvas]
        text, stopped = cut_at_stop(decode(all_ids), job.stop)
        if stopped:
            all_ids = ids_within(all_ids, len(text), decode)
        if out.stats is not None:
            usage = usage_of(out.stats)
        else:  # ended here at a stop string: the engine's stats were never produced
            usage = {"prompt_tokens": _prompt_token_count(job, model.tokenizer), "generated_tokens": len(all_ids),
                     "canvases": len(canvas_token_ids)}
        reason = "stop" if stopped else out.finish_reason or "stop"
        result = {"text": text, "finish_reason": reason, "usage": usage, "token_ids": all_ids}
        if job.logprobs is not None:
            result["logprobs"] = logprobs[:len(all_ids)]
        return result

    def stop_reached(canvas_token_ids: Sequence[Sequence[int]]) -> bool:
        if not job.stop:
            return False
        return cut_at_stop(decode([t for canvas in canvas_token_ids for t in canvas]), job.stop)[1]

    return PreparedJob(request=request, draft_event=text_event, canvas_event=text_event, result=result,
                       stop_reached=stop_reached, record_canvas=record_canvas)


def prepare_edit_job(job: EditJobCreate, model: ModelInfo) -> PreparedJob:
    """An edit job (issue 4): planned by `worker.edit_jobs.prepare_edit`."""
    prepared = prepare_edit(job, model.tokenizer, model.canvas_length, model.default_max_new_tokens)
    return PreparedJob(
        request=prepared.request,
        draft_event=lambda out: edit_draft_event(prepared, out, model.tokenizer),
        canvas_event=lambda out: {"canvas": out.canvas_index, "step": out.step},
        result=lambda canvases, out: edit_result(prepared, canvases, out, model.tokenizer),
        produced_tokens=lambda out: edit_produced_tokens(prepared, out),
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
