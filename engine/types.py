"""Engine inputs, outputs and statistics: plain frozen dataclasses (no torch).

What the worker hands `Engine.add_request` (`EngineRequest`, `SamplingParams`, `InfillCanvas`), what
`Engine.step` returns (`StepOutput`, `RequestStats`, `StepStats`), the checkpoint's generation defaults
(`GenerationDefaults`) and the engine's own sizing knobs (`EngineConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

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
    seed: int | None = None  # same seed -> same tokens whatever the batch
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
    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any],
                               fallback_stop_ids: tuple[int, ...] = ()) -> GenerationDefaults:
        """Build from the JSON of `generation_config.json` (missing keys keep the reference defaults)."""
        eos = generation_config.get("eos_token_id")
        if eos is None:
            stop_ids = tuple(fallback_stop_ids)
        else:
            stop_ids = (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)
        values: dict[str, Any] = {"stop_token_ids": stop_ids}
        sampler_config = generation_config.get("sampler_config")
        if isinstance(sampler_config, dict) and sampler_config.get("entropy_bound") is not None:
            values["entropy_bound"] = float(sampler_config["entropy_bound"])
        for f in fields(cls):
            if f.name != "stop_token_ids" and generation_config.get(f.name) is not None:
                values[f.name] = generation_config[f.name]
        return cls(**values)

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
    """Fill `None`s from the checkpoint defaults and validate; raises ValueError naming the bad field."""

    def pick(name: str) -> Any:
        value = getattr(params, name)
        return getattr(defaults, name) if value is None else value

    resolved = ResolvedParams(
        max_new_tokens=pick("max_new_tokens"), max_denoising_steps=pick("max_denoising_steps"),
        entropy_bound=pick("entropy_bound"), t_min=pick("t_min"), t_max=pick("t_max"),
        confidence_threshold=pick("confidence_threshold"), stability_threshold=pick("stability_threshold"),
        seed=seed, stream_drafts=bool(params.stream_drafts), fixed_steps=bool(params.fixed_steps),
    )
    _validate_resolved(resolved)
    return resolved


def _validate_resolved(p: ResolvedParams) -> None:
    for name in ("max_new_tokens", "max_denoising_steps"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(p.stability_threshold, bool) or not isinstance(p.stability_threshold, int) \
            or p.stability_threshold < 0:
        raise ValueError(f"stability_threshold must be an integer >= 0, got {p.stability_threshold!r}")
    for name in ("entropy_bound", "confidence_threshold", "t_min", "t_max"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if p.entropy_bound <= 0:
        raise ValueError(f"entropy_bound must be > 0, got {p.entropy_bound}")
    if p.confidence_threshold <= 0:
        raise ValueError(f"confidence_threshold must be > 0, got {p.confidence_threshold}")
    if p.t_min < 0:
        raise ValueError(f"t_min must be >= 0, got {p.t_min}")
    if p.t_max <= 0:
        raise ValueError(f"t_max must be > 0 (the temperature divides the logits), got {p.t_max}")
    if p.t_max < p.t_min:
        raise ValueError(f"t_max must be >= t_min, got t_max={p.t_max} < t_min={p.t_min}")


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
