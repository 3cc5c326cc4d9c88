"""Engine inputs, outputs and statistics: plain frozen dataclasses (no torch).

What the worker hands `Engine.add_request` (`EngineRequest`, `SamplingParams`, `InfillCanvas`), what
`Engine.step` returns (`StepOutput`, `RequestStats`, `StepStats`), the checkpoint's generation defaults
(`GenerationDefaults`) and the engine's own sizing knobs (`EngineConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dgtext.request_rules import (
    DEFAULTED_KNOBS,
    REFERENCE_SAMPLING_DEFAULTS,
    resolve_sampling,
    sampling_defaults_from_generation_config,
)

FinishReason = Literal["stop", "length", "aborted", "error"]
OutputKind = Literal["draft", "canvas", "finished"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters; `None` means "use the checkpoint's generation_config value"."""

    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    confidence_threshold: float | None = None
    stability_threshold: int | None = None
    # Same seed -> the same random draws whatever the batch (engine/rng.py); the same tokens when the batch is
    # the same too. Alone vs batched, tokens can differ where logits nearly tie: GEMMs round differently at
    # different row counts (docs/architecture.md, "Seeds and batching").
    seed: int | None = None
    stream_drafts: bool = False
    fixed_steps: bool = False  # benchmarks: never stop a canvas early


@dataclass(frozen=True)
class InfillCanvas:
    """A canvas with clamped positions (issue 4).

    `leading_token_ids` is fixed text encoded into the cache before this canvas (may be empty);
    `token_ids` and `is_fixed` have exactly canvas_length entries. Fixed positions always hold their id
    and are never re-noised; values at free positions are ignored.
    """

    leading_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    is_fixed: tuple[bool, ...]


@dataclass(frozen=True)
class EngineRequest:
    """One generation request: exactly one of `prompt` / `messages` / `prompt_token_ids`."""

    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    infill: tuple[InfillCanvas, ...] | None = None  # None -> open-ended generation


@dataclass(frozen=True)
class RequestStats:
    """Totals for one finished request (seconds are wall-clock on the engine's host)."""

    prompt_tokens: int
    generated_tokens: int
    canvases: int
    denoising_steps: int
    steps_per_canvas: float
    queue_seconds: float
    prefill_seconds: float
    run_seconds: float


@dataclass(frozen=True)
class StepOutput:
    """One event of one request from `Engine.step()`: token ids only; text is made at the edges (the worker's
    result assembly, the API), so the engine never decodes on its hot path.

    draft: argmax of this denoising step (only when `stream_drafts`); canvas: the committed ids of a finished
    canvas (positions after a stop token stripped); finished: the end of the request, with reason and stats,
    and for `finish_reason == "error"` the device error's message in `error` (None otherwise).
    """

    request_id: str
    kind: OutputKind
    canvas_index: int
    step: int  # denoising step within the canvas (1-based)
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    stats: RequestStats | None = None
    error: str | None = None


@dataclass(frozen=True)
class RequestResult:
    """Everything `Engine.generate` collected for one request.

    `canvases`: the committed ids of each canvas in order; `finished`: the request's "finished" output;
    `finished_at`: `time.perf_counter()` when the step that finished it returned.
    """

    request_id: str
    canvases: tuple[tuple[int, ...], ...]
    finished: StepOutput
    finished_at: float

    @property
    def token_ids(self) -> tuple[int, ...]:
        """All committed ids, canvases concatenated."""
        return tuple(token for canvas in self.canvases for token in canvas)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.finished.finish_reason


@dataclass(frozen=True)
class StepStats:
    """What one `Engine.step()` did: for metrics and benchmarks."""

    num_denoising_canvases: int = 0
    num_encoder_tokens: int = 0
    num_prefill_requests: int = 0
    num_committed_canvases: int = 0
    committed_tokens: int = 0
    forward_seconds: float = 0.0


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampler defaults of a checkpoint (`generation_config.json`), used where SamplingParams says None.

    The fallbacks are the published defaults of the reference generation config; stop ids have no fallback
    here: the loader fills them from generation_config.json or config.json.
    """

    stop_token_ids: tuple[int, ...]
    max_new_tokens: int = int(REFERENCE_SAMPLING_DEFAULTS["max_new_tokens"])
    max_denoising_steps: int = int(REFERENCE_SAMPLING_DEFAULTS["max_denoising_steps"])
    entropy_bound: float = REFERENCE_SAMPLING_DEFAULTS["entropy_bound"]
    t_min: float = REFERENCE_SAMPLING_DEFAULTS["t_min"]
    t_max: float = REFERENCE_SAMPLING_DEFAULTS["t_max"]
    stability_threshold: int = int(REFERENCE_SAMPLING_DEFAULTS["stability_threshold"])
    confidence_threshold: float = REFERENCE_SAMPLING_DEFAULTS["confidence_threshold"]

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any],
                               fallback_stop_ids: tuple[int, ...] = ()) -> GenerationDefaults:
        """Build from the JSON of `generation_config.json` (missing keys keep the reference defaults)."""
        eos = generation_config.get("eos_token_id")
        if eos is None:
            stop_ids = tuple(fallback_stop_ids)
        else:
            stop_ids = (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)
        defaults: dict[str, Any] = sampling_defaults_from_generation_config(generation_config)
        return cls(stop_token_ids=stop_ids, **defaults)

    def sampling_defaults(self) -> dict[str, int | float]:
        """The knob defaults by name, as `dgtext.request_rules` takes them."""
        return {name: getattr(self, name) for name in DEFAULTED_KNOBS}

    def to_generation_config(self) -> dict[str, Any]:
        """The inverse of `from_generation_config`, in the layout the reference reads."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": {"entropy_bound": self.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
            "t_min": self.t_min,
            "t_max": self.t_max,
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": self.confidence_threshold,
            "eos_token_id": list(self.stop_token_ids),
        }


@dataclass(frozen=True)
class ResolvedParams:
    """SamplingParams with every default filled in and validated (internal to the engine)."""

    max_new_tokens: int
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    confidence_threshold: float
    stability_threshold: int
    seed: int
    stream_drafts: bool
    fixed_steps: bool


def resolve_params(params: SamplingParams, defaults: GenerationDefaults, seed: int) -> ResolvedParams:
    """Fill `None`s from the checkpoint defaults and validate with the API's own rules
    (`dgtext.request_rules.resolve_sampling`); raises ValueError (`RequestFieldError`) naming the bad field."""
    given = {name: getattr(params, name) for name in DEFAULTED_KNOBS}
    resolved = resolve_sampling({**given, "seed": seed}, defaults.sampling_defaults())
    return ResolvedParams(**resolved, stream_drafts=bool(params.stream_drafts), fixed_steps=bool(params.fixed_steps))


@dataclass(frozen=True)
class EngineConfig:
    """Sizing knobs of one Engine.

    max_canvases_in_flight: canvases denoised together in one decoder forward (also bounds running requests).
    max_tokens_per_forward: padded tokens in one encoder forward (prefill chunks + commits + infill leading
        text), i.e. rows x the widest row, since rows are padded to the widest (engine/scheduler.py).
    kv_cache_bytes: byte budget for the KV cache; None -> kv_cache_memory_fraction of free device memory
        (CUDA) or 1 GiB (CPU). The number of slots is budget // bytes_per_slot, capped at max_canvases_in_flight.
    max_context: the longest sequence (prompt + generated canvases) one slot holds.
    """

    max_canvases_in_flight: int = 16
    max_tokens_per_forward: int = 8192
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.5
    max_context: int = 4096
    vocab_chunk_size: int = 4096  # sampler: vocabulary read in chunks of this many ids (bounds temporaries)
    compile_sampler: bool | None = None  # torch.compile the sampler's vocabulary scan; None -> only on CUDA

    def __post_init__(self) -> None:
        for name in ("max_canvases_in_flight", "max_tokens_per_forward", "max_context", "vocab_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"EngineConfig.kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("EngineConfig.kv_cache_memory_fraction must be in (0, 1], "
                             f"got {self.kv_cache_memory_fraction}")
