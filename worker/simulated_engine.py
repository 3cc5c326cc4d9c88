"""`SimulatedEngine`: an engine without a model, for loading the control plane (API, Redis, Celery, the worker's
threads) at job rates no CPU could compute. `bench/load_sim.py` runs workers on it; nothing else should.

It implements `worker.protocols.EngineLike` the way `engine.engine.Engine` behaves, minus the math:
- requests are validated with the same rules (prompt encoded with the checkpoint's tokenizer, sampler knobs
  resolved against its generation config, positions checked against `request_limits`), so the API and the
  worker see the same refusals;
- step-level continuous batching: requests wait FIFO and join the batch at the next step while fewer than
  `max_batch` canvases are in flight (the real engine's `max_canvases_in_flight`);
- every step lasts `BatchTimeModel.seconds(n)` of wall clock for n canvases in flight (a sleep: the engine
  loop's thread releases the GIL as it would during a CUDA step);
- each canvas takes its request's resolved `max_denoising_steps` steps (the real sampler's upper bound: it
  stops a canvas earlier once it is confident), then commits `canvas_length` ids, or the rest of
  `max_new_tokens`; infill canvases keep their fixed positions;
- the ids are deterministic: drawn from ordinary vocabulary ids with the request's seed (the request id's
  hash when no seed is given), never a stop id, so open-ended requests end with "length";
- outputs, `RequestStats` and `StepStats` have the real engine's shapes, so the worker's events, commits,
  leases and metrics run unchanged.

The default batch-time model is the `tiny` preset's measured step time on the shared 2-core CPU (docs/
benchmarks.md, "Engine vs the transformers reference (issue 2)", first table, column "ours ms/fwd":
9.16 / 12.49 / 35.58 ms at batch 1 / 4 / 16). `DGSERVE_WORKER_SIMULATED_STEP_MS` replaces it (e.g. with
a GPU's table once one is measured); its default is `WorkerSettings.worker_simulated_step_ms`.
"""

from __future__ import annotations

import bisect
import json
import random
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dgtext.checkpoint_files import TOKENIZER_FILE_PATTERNS, resolve_model_dir
from dgtext.request_rules import (
    ModelLimits,
    check_generate_positions,
    check_infill_positions,
    open_ended_canvases,
)
from dgtext.tokenizer import PromptTokenizer
from engine.block_manager import PrefixCacheStats
from engine.types import (
    EngineRequest,
    FinishReason,
    GenerationDefaults,
    RequestStats,
    ResolvedParams,
    StepOutput,
    StepStats,
    TokenLogprob,
    resolve_params,
)
from services.prompt_limits import checkpoint_limits

LOG_HALF = -0.6931471805599453  # the placeholder log-probability of a simulated token
# Ordinary text whose ids the simulated canvases are drawn from (no special ids, so nothing stops early).
_FILLER_TEXT = (" the quick brown fox jumps over the lazy dog while a server queues jobs and workers"
                " denoise canvases of tokens in parallel, step after step, until every job is done")


@dataclass(frozen=True)
class BatchTimeModel:
    """Step time as a function of the canvases in flight: piecewise linear through measured (batch, seconds)
    points, extended along the last segment above the largest measured batch (and flat below the smallest)."""

    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        batches = [batch for batch, _ in self.points]
        if not self.points or batches != sorted(set(batches)) or batches[0] < 1:
            raise ValueError(f"batch-time points must have distinct increasing batch sizes >= 1, got {self.points}")
        if any(seconds <= 0 for _, seconds in self.points):
            raise ValueError(f"batch-time points must have positive step times, got {self.points}")

    @classmethod
    def parse(cls, text: str, scale: float = 1.0) -> BatchTimeModel:
        """`"1:9.16,4:12.49,16:35.58"` (batch:milliseconds, comma separated), each time multiplied by `scale`."""
        try:
            pairs = [item.split(":") for item in text.replace(" ", "").split(",") if item]
            points = tuple(sorted((int(batch), float(ms) * scale / 1000.0) for batch, ms in pairs))
        except ValueError as err:
            raise ValueError(f"worker_simulated_step_ms: expected 'batch:ms,batch:ms,...', got {text!r}") from err
        return cls(points)

    def seconds(self, batch: int) -> float:
        """Wall-clock seconds of one step with `batch` canvases in flight (0 for an empty step)."""
        if batch <= 0:
            return 0.0
        batches = [b for b, _ in self.points]
        if len(self.points) == 1 or batch <= batches[0]:
            return self.points[0][1]
        index = min(max(bisect.bisect_left(batches, batch), 1), len(batches) - 1)
        (b0, s0), (b1, s1) = self.points[index - 1], self.points[index]
        return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)


@dataclass(frozen=True)
class SimulatedModelConfig:
    """The one model dimension the worker reads from an engine (`engine.config.canvas_length`)."""

    canvas_length: int


@dataclass
class _SimRequest:
    """One request's progress. Canvas ids are drawn when its canvas starts (one `random.Random` per request)."""

    request_id: str
    prompt_tokens: int
    params: ResolvedParams
    num_canvases: int
    infill: tuple | None
    rng: random.Random
    added_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    canvas_index: int = 0
    step: int = 0
    total_steps: int = 0
    generated: int = 0
    canvas_ids: tuple[int, ...] = ()


class SimulatedEngine:
    """See the module doc. One thread calls every method (the worker's engine loop)."""

    def __init__(self, tokenizer: PromptTokenizer, limits: ModelLimits, generation_defaults: GenerationDefaults,
                 max_batch: int, batch_time: BatchTimeModel,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.tokenizer = tokenizer
        self.config = SimulatedModelConfig(canvas_length=limits.canvas_length)
        self.generation_defaults = generation_defaults
        self.max_batch, self.batch_time, self._sleep = max_batch, batch_time, sleep
        self._limits = limits
        stop_ids = set(generation_defaults.stop_token_ids)
        self._filler_ids = tuple(sorted({i for i in tokenizer.encode(_FILLER_TEXT) if i not in stop_ids}))
        self._waiting: deque[_SimRequest] = deque()
        self._running: dict[str, _SimRequest] = {}
        self._pending: list[StepOutput] = []  # ends of aborted requests, reported by the next step()
        self.last_step_stats = StepStats()

    @classmethod
    def from_checkpoint(cls, model: str | Path, max_batch: int, max_context: int,
                        batch_time: BatchTimeModel) -> SimulatedEngine:
        """The tokenizer, canvas length and generation defaults of a checkpoint (no weights are read or
        downloaded); requests may hold up to `max_context` positions, as `EngineConfig.max_context`."""
        folder = resolve_model_dir(model, allow_patterns=TOKENIZER_FILE_PATTERNS)
        limits = checkpoint_limits(folder)
        if limits is None:
            raise ValueError(f"model: {folder} has no config.json; the simulated engine needs the checkpoint's "
                             "canvas length and tokenizer")
        tokenizer = PromptTokenizer.from_dir(folder)
        generation_path = folder / "generation_config.json"
        generation = GenerationDefaults.from_generation_config(
            json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else {},
            fallback_stop_ids=tokenizer.eos_ids)
        limits = ModelLimits(canvas_length=limits.canvas_length,
                             max_positions=min(max_context, limits.max_positions),
                             sampling_defaults=limits.sampling_defaults)
        return cls(tokenizer, limits, generation, max_batch=max_batch, batch_time=batch_time)

    @property
    def request_limits(self) -> ModelLimits:
        return self._limits

    # -- requests ----------------------------------------------------------------------------------------------
    def add_request(self, req: EngineRequest, request_id: str | None = None) -> str:
        """Validate like `Engine.add_request` (ValueError naming the field) and queue the request."""
        request_id = request_id if request_id is not None else f"sim-{time.monotonic_ns()}"
        if request_id in self._running or any(r.request_id == request_id for r in self._waiting):
            raise ValueError(f"request id {request_id!r} is already in the engine")
        prompt_ids = self._prompt_ids(req)
        seed = req.params.seed if req.params.seed is not None else zlib.crc32(request_id.encode())
        params = resolve_params(req.params, self.generation_defaults, seed)
        infill = tuple(req.infill) if req.infill is not None else None
        if infill is None:
            num_canvases = open_ended_canvases(params.max_new_tokens, self._limits.canvas_length)
            check_generate_positions(len(prompt_ids), params.max_new_tokens, self._limits)
        else:
            if not infill or any(len(c.token_ids) != self._limits.canvas_length for c in infill):
                raise ValueError(f"infill: every canvas must hold canvas_length={self._limits.canvas_length} ids")
            num_canvases = len(infill)
            leading = sum(len(canvas.leading_token_ids) for canvas in infill)
            check_infill_positions(len(prompt_ids), leading, num_canvases, self._limits, field_name="prompt_token_ids")
        self._waiting.append(_SimRequest(request_id, len(prompt_ids), params, num_canvases, infill,
                                         random.Random(seed)))
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a request; the next step() reports it finished with "aborted". Unknown ids are ignored."""
        request = self._running.pop(request_id, None)
        if request is None:
            request = next((r for r in self._waiting if r.request_id == request_id), None)
            if request is None:
                return
            self._waiting.remove(request)
        self._pending.append(self._finished(request, "aborted"))

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting or self._pending)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def kv_stats(self) -> PrefixCacheStats:
        """No KV cache is simulated: nothing queried, nothing held (one block per pool, for the gauges)."""
        return PrefixCacheStats(query_tokens=0, hit_tokens=0, evicted_blocks=0, full_blocks_used=0,
                                full_blocks_total=1, sliding_blocks_used=0, sliding_blocks_total=1)

    # -- the step ----------------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Admit waiting requests into free batch rows, sleep one batch-time step, advance every canvas."""
        started = time.monotonic()
        outputs, self._pending = self._pending, []
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting.popleft()
            request.admitted_at = started
            self._running[request.request_id] = request
        batch = len(self._running)
        step_seconds = self.batch_time.seconds(batch)
        committed = 0
        for request in list(self._running.values()):
            for out in self._advance(request):
                committed += len(out.token_ids) if out.kind == "canvas" else 0
                outputs.append(out)
        remaining = started + step_seconds - time.monotonic()  # the bookkeeping above is part of the step
        if remaining > 0:
            self._sleep(remaining)
        self.last_step_stats = StepStats(num_denoising_canvases=batch, num_committed_canvases=sum(
            1 for out in outputs if out.kind == "canvas"), committed_tokens=committed, forward_seconds=step_seconds)
        return outputs

    def _advance(self, request: _SimRequest) -> list[StepOutput]:
        if request.step == 0:
            request.canvas_ids = self._draw_canvas(request)
        request.step += 1
        request.total_steps += 1
        outputs = []
        if request.params.stream_drafts:
            outputs.append(StepOutput(request.request_id, "draft", request.canvas_index, request.step,
                                      request.canvas_ids))
        if request.step < request.params.max_denoising_steps:
            return outputs
        kept = request.canvas_ids if request.infill is not None else \
            request.canvas_ids[:request.params.max_new_tokens - request.generated]
        request.generated += len(kept)
        outputs.append(StepOutput(request.request_id, "canvas", request.canvas_index, request.step, kept,
                                  logprobs=self._logprobs(kept, request.params.logprobs)))
        if request.canvas_index + 1 >= request.num_canvases:
            del self._running[request.request_id]
            outputs.append(self._finished(request, "stop" if request.infill is not None else "length"))
        else:
            request.canvas_index, request.step = request.canvas_index + 1, 0
        return outputs

    def _draw_canvas(self, request: _SimRequest) -> tuple[int, ...]:
        drawn = request.rng.choices(self._filler_ids, k=self._limits.canvas_length)
        if request.infill is None:
            return tuple(drawn)
        canvas = request.infill[request.canvas_index]
        return tuple(fixed_id if is_fixed else new_id
                     for fixed_id, is_fixed, new_id in zip(canvas.token_ids, canvas.is_fixed, drawn, strict=True))

    @staticmethod
    def _logprobs(ids: Sequence[int], alternatives: int | None) -> tuple[TokenLogprob, ...] | None:
        """Placeholder log-probabilities in the real shape (every id at log 0.5, `alternatives` of them)."""
        if alternatives is None:
            return None
        return tuple(TokenLogprob(token, LOG_HALF, ((token, LOG_HALF),) * alternatives) for token in ids)

    def _finished(self, request: _SimRequest, reason: FinishReason) -> StepOutput:
        now = time.monotonic()
        admitted = request.admitted_at if request.admitted_at is not None else now
        canvases = request.canvas_index + 1 if request.total_steps else 0
        stats = RequestStats(prompt_tokens=request.prompt_tokens, generated_tokens=request.generated,
                             canvases=canvases, denoising_steps=request.total_steps,
                             steps_per_canvas=request.total_steps / canvases if canvases else 0.0,
                             queue_seconds=admitted - request.added_at, prefill_seconds=0.0,
                             run_seconds=now - admitted)
        return StepOutput(request.request_id, "finished", request.canvas_index, request.step, (),
                          finish_reason=reason, stats=stats)

    def _prompt_ids(self, req: EngineRequest) -> Sequence[int]:
        given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(req, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
        ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else \
            self.tokenizer.encode_prompt(prompt=req.prompt, messages=req.messages)
        if not ids:
            raise ValueError("the prompt is empty: it must encode to at least one token")
        if any(not 0 <= token < self.tokenizer.vocab_size for token in ids):
            raise ValueError(f"prompt_token_ids: every id must be in 0..{self.tokenizer.vocab_size - 1}")
        return ids
