"""Wire schemas, version v1: what clients send to and receive from the job API.

Every model forbids unknown fields and bounds its values. Limits that depend on the deployment
(max_new_tokens_limit, max_document_chars, prompt length in tokens) are checked by the API with
`services.prompt_limits` because they come from `Settings`, not from the wire format.

Character offsets in edits are Python string indices, i.e. Unicode code points (not bytes, not UTF-16
units): `document[start:end]` is the span that gets replaced.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, model_validator

from dgtext import edits as edit_planning
from dgtext.request_rules import SAMPLING_BOUNDS, RequestFieldError

SCHEMA_VERSION = "v1"
# Static ceilings of the wire format; deployments configure tighter limits in Settings.
MAX_PROMPT_CHARS = 1_000_000
MAX_DOCUMENT_CHARS = 10_000_000
MAX_MESSAGES = 512
MAX_EDITS = 256
MAX_INSTRUCTION_CHARS = 4000

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "expired"})
# Event types a job's stream ends with (one per terminal status); nothing is appended after them.
TERMINAL_EVENTS: frozenset[str] = frozenset({"done", "failed", "cancelled", "expired"})
JobKind = Literal["generate", "edit"]


# A validation failure that names its field (e.g. `edits[2]`); the API reports that field. One class for the
# schema, the request rules of dgtext and the edit planner, so every refusal reads the same.
FieldValueError = RequestFieldError


class WireModel(BaseModel):
    """Unknown fields are refused and types are strict: `true`, `"8"` or `8.0` are not an integer, `0` is
    not a boolean, `"0.5"` is not a number (an integer is a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _knob(name: str, description: str) -> Any:
    """The wire field of a sampler knob, bounded by `dgtext.request_rules.SAMPLING_BOUNDS` (the engine checks
    the same bounds) and strict: `true`, `"8"` or `8.0` are not an integer, `"0.5"` is not a number."""
    bound = SAMPLING_BOUNDS[name]
    low: dict[str, Any] = {"ge": bound.minimum} if bound.minimum_inclusive else {"gt": bound.minimum}
    return Field(default=None, strict=True, le=bound.maximum, description=description, **low)


class DiffusionKnobs(WireModel):
    """The denoising controls of `engine.types.SamplingParams`; None means the model's default."""

    max_denoising_steps: int | None = _knob("max_denoising_steps", "step cap per canvas")
    entropy_bound: float | None = _knob("entropy_bound", "entropy budget per step")
    t_min: float | None = _knob("t_min", "temperature at the last step; at most t_max")
    t_max: float | None = _knob("t_max", "temperature at the first step; at least t_min")
    confidence_threshold: float | None = _knob("confidence_threshold", "mean entropy to stop")
    stability_threshold: int | None = _knob("stability_threshold", "unchanged steps to stop")
    seed: int | None = _knob("seed", "same seed, same tokens whatever the batch")

    @model_validator(mode="after")
    def _check_temperatures(self) -> DiffusionKnobs:
        # Against the model's defaults the API checks again at submit (services/prompt_limits.py).
        if self.t_min is not None and self.t_max is not None and self.t_min > self.t_max:
            raise FieldValueError("t_max", f"t_max {self.t_max} is below t_min {self.t_min}; t_min <= t_max is "
                                  "required")
        return self

    def knob_values(self) -> dict[str, Any]:
        """The knobs that were set, by name."""
        return self.model_dump(include=set(DiffusionKnobs.model_fields), exclude_none=True)


class SamplingOptions(DiffusionKnobs):
    """Sampler parameters, mirroring `engine.types.SamplingParams`; None means the model's default."""

    max_new_tokens: int | None = _knob("max_new_tokens", "tokens to generate at most")
    stream_drafts: bool = Field(default=False, strict=True,
                                description="emit a `draft` event after every denoising step")

    def sampling_params(self) -> dict[str, Any]:
        """Keyword arguments for `engine.types.SamplingParams` (unset values left out)."""
        return self.model_dump(include=set(SamplingOptions.model_fields), exclude_none=True)


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


def _exactly_one_of(*alternatives: tuple[tuple[str, ...], dict[str, Any]]) -> dict[str, Any]:
    """JSON Schema `oneOf` for "exactly one of these groups of fields": each alternative requires its fields
    (with their non-null type) and leaves the other groups' fields absent or null."""
    every = {name: kind for names, kind in alternatives for name in names}
    branches = []
    for names, kind in alternatives:
        properties = {name: {"type": "null"} for name in every if name not in names}
        properties.update({name: kind for name in names})
        branches.append({"required": list(names), "properties": properties})
    return {"oneOf": branches}


class GenerateJobCreate(SamplingOptions):
    """Open-ended generation from a raw `prompt` or chat `messages` (exactly one)."""

    model_config = ConfigDict(json_schema_extra=_exactly_one_of(
        (("prompt",), {"type": "string"}), (("messages",), {"type": "array"})))

    kind: Literal["generate"] = "generate"
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> GenerateJobCreate:
        if (self.prompt is None) == (self.messages is None):
            raise FieldValueError("prompt", "give exactly one of `prompt` (text) or `messages` (chat turns)")
        return self


class EditSpec(WireModel):
    """One span to regenerate: `start`/`end` character offsets, or `find`, a string occurring exactly once.
    `max_tokens` 0 deletes the span."""

    model_config = ConfigDict(json_schema_extra=_exactly_one_of(
        (("find",), {"type": "string"}), (("start", "end"), {"type": "integer"})))

    start: int | None = Field(default=None, ge=0, strict=True)
    end: int | None = Field(default=None, ge=0, strict=True)
    find: str | None = Field(default=None, min_length=1, max_length=MAX_DOCUMENT_CHARS)
    instruction: str | None = Field(default=None, max_length=MAX_INSTRUCTION_CHARS)
    max_tokens: int | None = Field(default=None, ge=0, le=65_536, strict=True,
                                   description="cap on the replacement length (0 deletes the span)")

    def as_plan_spec(self) -> edit_planning.EditSpec:
        return edit_planning.EditSpec(self.start, self.end, self.find, self.instruction, self.max_tokens)


class EditJobCreate(SamplingOptions):
    """Regenerate spans of `document` in place, with the text on both sides in view (issue 4).

    Spans are checked by `dgtext.edits.resolve_edits`, the function the worker plans with: inside the
    document, not reversed, `find` occurring exactly once, disjoint (touching is fine; two insertions at one
    offset are not).
    """

    kind: Literal["edit"] = "edit"
    document: str = Field(max_length=MAX_DOCUMENT_CHARS)
    edits: list[EditSpec] = Field(min_length=1, max_length=MAX_EDITS)

    @model_validator(mode="after")
    def _check_spans(self) -> EditJobCreate:
        self.resolved_edits()
        return self

    def resolved_edits(self) -> list[edit_planning.ResolvedEdit]:
        """The edits validated and sorted by position (raises `EditValidationError`, a `FieldValueError`)."""
        return edit_planning.resolve_edits(self.document, [edit.as_plan_spec() for edit in self.edits])

    def resolved_spans(self) -> list[tuple[int, int]]:
        """`(start, end)` character offsets of each edit, in the order given (find strings resolved)."""
        by_index = {edit.index: (edit.start, edit.end) for edit in self.resolved_edits()}
        return [by_index[index] for index in range(len(self.edits))]


def _job_kind(value: Any) -> str:
    # A body without `kind` is a generate job: the common case needs no boilerplate.
    if isinstance(value, dict):
        return str(value.get("kind", "generate"))
    return str(getattr(value, "kind", "generate"))


JobCreate = Annotated[
    Annotated[GenerateJobCreate, Tag("generate")] | Annotated[EditJobCreate, Tag("edit")],
    Discriminator(_job_kind, custom_error_type="invalid_kind",
                  custom_error_message="kind must be 'generate' or 'edit'"),
]
JOB_CREATE_ADAPTER: TypeAdapter[GenerateJobCreate | EditJobCreate] = TypeAdapter(JobCreate)


def parse_job_create(data: Any) -> GenerateJobCreate | EditJobCreate:
    """Validate a decoded JSON body (or a stored payload) into a job request."""
    return JOB_CREATE_ADAPTER.validate_python(data)


class Progress(WireModel):
    canvas: int = Field(ge=0, description="index of the canvas being denoised (0-based)")
    step: int = Field(ge=0, description="denoising step within that canvas (1-based once started)")


class Timings(WireModel):
    created_at: float = Field(description="unix seconds")
    started_at: float | None = None
    finished_at: float | None = None
    queue_seconds: float | None = Field(default=None, description="created → (last) start")
    run_seconds: float | None = Field(default=None, description="(last) start → finish")


class JobError(WireModel):
    code: str
    message: str


class JobPublic(WireModel):
    """The job as clients see it (`GET /v1/jobs/{id}`)."""

    object: Literal["job"] = "job"
    version: Literal["v1"] = "v1"
    id: str
    kind: JobKind
    status: JobStatus
    progress: Progress | None = None
    result: dict[str, Any] | None = None
    timings: Timings
    attempts: int = 0
    expires_at: float = Field(description="unix seconds after which the record is deleted")
    cancel_requested: bool = False
    error: JobError | None = None


class JobAccepted(WireModel):
    """Body of `202 Accepted` for `POST /v1/jobs`."""

    object: Literal["job"] = "job"
    id: str
    kind: JobKind
    status: JobStatus
    created_at: float
    expires_at: float
    location: str


class ErrorDetail(WireModel):
    code: str = Field(description="machine-readable, e.g. invalid_request, not_found, queue_full")
    message: str
    field: str | None = Field(default=None, description="offending field, e.g. `edits[2]` or `max_new_tokens`")


class ErrorBody(WireModel):
    """The one error shape of every non-2xx response."""

    error: ErrorDetail


class WorkerLoad(WireModel):
    """One live worker in `GET /readyz`: numbers from its last heartbeat (`WorkerMetrics.load_snapshot`)."""

    worker_id: str | None = None
    gpu: str | None = Field(default=None, description="card index, or cpu")
    last_seen: float | None = Field(default=None, description="unix seconds of the heartbeat")
    generated_tokens: int | None = Field(default=None, ge=0, description="tokens generated since the worker started")
    canvases_in_flight: int | None = Field(default=None, ge=0, description="requests being denoised")
    canvases_waiting: int | None = Field(default=None, ge=0, description="requests waiting for a slot")
    memory_used_bytes: int | None = Field(default=None, ge=0)
    memory_total_bytes: int | None = Field(default=None, ge=0)


class Readiness(WireModel):
    """Body of `GET /readyz`: 200 when jobs can run now, 503 with `reason` otherwise."""

    ready: bool
    redis: bool = Field(description="Redis answered")
    workers: int = Field(ge=0, description="live workers of this API's model queue")
    queue: str | None = None
    model: str | None = None
    reason: str | None = Field(default=None, description="why not ready")
    worker_load: list[WorkerLoad] = Field(default_factory=list, description="each live worker's card and load, "
                                          "as its last heartbeat reported it (the playground's service panel)")
