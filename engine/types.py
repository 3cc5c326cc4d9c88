"""Engine inputs, outputs and statistics: plain frozen dataclasses (no torch).

What the worker hands `Engine.add_request` (`EngineRequest`, `SamplingParams`, `InfillCanvas`), what
`Engine.step` returns (`StepOutput`, `RequestStats`, `StepStats`), the checkpoint's generation defaults
(`GenerationDefaults`) and the engine's own sizing knobs (`EngineConfig`).
"""

from __future__ import annotations

import math
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
    # Per-request draw knobs (engine/sampler.py, "Per-request knobs", has the exact rules):
    temperature: float | None = None  # None -> 1.0; multiplies the t_min..t_max schedule; 0 -> greedy draw
    top_k: int | None = None  # None or 0 -> off; else draw among the k most likely ids (k <= MAX_TOP_K)
    top_p: float | None = None  # None or 1.0 -> off; else draw from the nucleus of mass top_p (0 < top_p <= 1)
    logprobs: int | None = None  # None -> off; n in 0..MAX_LOGPROBS: canvas outputs carry TokenLogprob entries


MAX_TOP_K = 1024  # top_k / top_p act on this many most likely ids per position (engine/sampler.py)
MAX_LOGPROBS = 20  # the most alternatives a TokenLogprob carries (the OpenAI API's own limit)


@dataclass(frozen=True)
class TokenLogprob:
    """One committed token's log-probability and its top alternatives.

    Log-probabilities are log_softmax of the final denoising step's logits of the token's position, after the
    softcap and at temperature 1 (neither the diffusion temperature nor top_k/top_p applies): what the model
    predicted when the canvas was committed. `top` holds the n most likely (token_id, logprob), best first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


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
    cached_prompt_tokens: int = 0  # prompt tokens whose KV the prefix cache supplied (not encoded)


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
    logprobs: tuple[TokenLogprob, ...] | None = None  # canvas outputs of a request with logprobs: one per id
    error: str | None = None  # finished with reason "error": what went wrong


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
    temperature: float = 1.0  # 0 = greedy draw
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    logprobs: int | None = None  # None = off

    @property
    def truncates_draw(self) -> bool:
        """Whether top_k or top_p restricts this request's draw."""
        return self.top_k > 0 or self.top_p < 1.0


def resolve_params(params: SamplingParams, defaults: GenerationDefaults, seed: int) -> ResolvedParams:
    """Fill `None`s from the checkpoint defaults and validate with the API's own rules
    (`dgtext.request_rules.resolve_sampling`) and the draw knobs' rules; raises ValueError naming the bad field."""
    given = {name: getattr(params, name) for name in DEFAULTED_KNOBS}
    resolved = resolve_sampling({**given, "seed": seed}, defaults.sampling_defaults())
    return ResolvedParams(**resolved, stream_drafts=bool(params.stream_drafts), fixed_steps=bool(params.fixed_steps),
                          **_validated_draw_knobs(params))


def _validated_draw_knobs(params: SamplingParams) -> dict[str, Any]:
    """temperature, top_k, top_p and logprobs with their off values filled in; ValueError naming the field."""
    def is_number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    def is_int(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, int)

    temperature = 1.0 if params.temperature is None else params.temperature
    if not is_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {params.temperature!r}")
    top_k = 0 if params.top_k is None else params.top_k
    if not is_int(top_k) or not 0 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be an integer in 0..{MAX_TOP_K} (0 = off), got {params.top_k!r}")
    top_p = 1.0 if params.top_p is None else params.top_p
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {params.top_p!r}")
    if params.logprobs is not None and (not is_int(params.logprobs) or not 0 <= params.logprobs <= MAX_LOGPROBS):
        raise ValueError(f"logprobs must be an integer in 0..{MAX_LOGPROBS} or None, got {params.logprobs!r}")
    return {"temperature": float(temperature), "top_k": top_k, "top_p": float(top_p), "logprobs": params.logprobs}


@dataclass(frozen=True)
class EngineConfig:
    """Sizing knobs of one Engine.

    max_canvases_in_flight: canvases denoised together in one decoder forward (also bounds running requests).
    max_tokens_per_forward: padded tokens in one encoder forward (prefill chunks + commits + infill leading
        text), i.e. rows x the widest row, since rows are padded to the widest (engine/scheduler.py).
    kv_cache_bytes: byte budget for the paged KV cache; None -> kv_cache_memory_fraction of free device memory
        (CUDA) or 1 GiB (CPU). It is split into blocks once at start (engine/runner.py, `plan_kv_pools`).
    max_context: the longest sequence (prompt + generated canvases) one request holds.
    block_size: positions per KV block (a power of two).
    enable_prefix_caching: reuse the KV of cached leading blocks across requests (off: every request encodes
        its whole prompt; tokens are the same either way).
    sliding_chunk_tokens: longest encode chunk of one row when the model has sliding layers. Every request in
        flight reserves sliding blocks for its window plus one such chunk: smaller fits more requests in a
        budget, larger prefills long prompts in fewer steps.
    """

    max_canvases_in_flight: int = 16
    max_tokens_per_forward: int = 8192
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.5
    max_context: int = 4096
    vocab_chunk_size: int = 4096  # sampler: vocabulary read in chunks of this many ids (bounds temporaries)
    compile_sampler: bool | None = None  # torch.compile the sampler's vocabulary scan; None -> only on CUDA
    block_size: int = 16
    enable_prefix_caching: bool = True
    sliding_chunk_tokens: int = 256
    # The decoder step as one torch.compile(fullgraph=True) graph per batch bucket (engine/compiled_step.py);
    # None -> compiled on CUDA (CUDA graphs), eager on CPU, where one graph takes 100-300 s to compile on the
    # 2-core machine and the compiled step is slower than eager at batch 16 (docs/benchmarks.md, issue 14).
    compile_step: bool | None = None
    # The encoder passes (prefill chunks, commits) likewise, one graph per (rows, tokens, table widths) bucket;
    # None -> as compile_step. Off with the step compiled: fewer graphs to compile (an encoder pass runs once
    # per canvas, the decoder step every denoising step).
    compile_encoder: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_canvases_in_flight", "max_tokens_per_forward", "max_context", "vocab_chunk_size",
                     "block_size", "sliding_chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size must be a power of two, got {self.block_size!r}")
        for name in ("compile_step", "compile_encoder"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"EngineConfig.kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("EngineConfig.kv_cache_memory_fraction must be in (0, 1], "
                             f"got {self.kv_cache_memory_fraction}")
