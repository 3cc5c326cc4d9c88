"""The engine loop: `add_request`, `step`, `abort`, `has_unfinished` (docs/architecture.md).

Each `step()`: the scheduler plans (plain Python) -> the runner runs the encoder forwards (prefills, commits,
infill leading text; one per group of similar row lengths) and one decoder forward for every canvas in
flight, then the batched sampler -> the engine turns the host copy of each canvas's argmax into drafts,
committed canvases and finished requests.
Not thread-safe: one thread owns an Engine and calls all of its methods.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dgtext.request_rules import (
    ModelLimits,
    check_generate_positions,
    check_infill_positions,
    open_ended_canvases,
)
from engine.block_manager import PrefixCacheStats
from engine.runner import CanvasResult, ModelRunner
from engine.scheduler import Scheduler, SequenceState
from engine.types import (
    EngineConfig,
    EngineRequest,
    FinishReason,
    RequestResult,
    RequestStats,
    StepOutput,
    StepStats,
    resolve_params,
)


class Engine:
    """Step-level continuous batching over one loaded model (`engine.loader.LoadedModel`)."""

    def __init__(self, loaded: Any, engine_config: EngineConfig | None = None) -> None:
        self.engine_config = engine_config or EngineConfig()
        self.model, self.config = loaded.model, loaded.config
        self.tokenizer = loaded.tokenizer
        self.generation_defaults = loaded.generation_defaults
        self._stop_ids = frozenset(self.generation_defaults.stop_token_ids or self.config.eos_token_ids)
        self.runner = ModelRunner(self.model, self.config, self.engine_config)
        self.scheduler = Scheduler(self.runner.kv, self.engine_config.max_canvases_in_flight,
                                   self.engine_config.max_tokens_per_forward, self.config.canvas_length,
                                   max_encode_row=self.runner.pools.max_encode_row)
        self._sequences: dict[str, SequenceState] = {}
        self._pending_outputs: list[StepOutput] = []  # aborts, reported by the next step()
        self._seed_source = random.SystemRandom()
        self.last_step_stats = StepStats()

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **engine_options: Any) -> Engine:
        """Load a checkpoint (local folder or hub id) and build an Engine; options are EngineConfig fields."""
        from engine.loader import load_model

        return cls(load_model(model, device=device, dtype=dtype), EngineConfig(**engine_options))

    # ----- requests -----

    def add_request(self, req: EngineRequest, request_id: str | None = None) -> str:
        """Validate and queue a request; it joins the batch at the next step. Raises ValueError for anything
        that could not run (so nothing fails later inside the loop)."""
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self._sequences:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        prompt_ids = self._prompt_ids(req)
        seed = req.params.seed
        if seed is None:  # greedy requests are reproducible without a seed: the noise comes from seed 0
            seed = 0 if req.params.temperature == 0 else self._seed_source.getrandbits(63)
        params = resolve_params(req.params, self.generation_defaults, seed)
        infill = self._validated_infill(req)
        limits = self.request_limits
        leading = 0
        if infill is None:
            num_canvases = open_ended_canvases(params.max_new_tokens, limits.canvas_length)
            check_generate_positions(len(prompt_ids), params.max_new_tokens, limits)
        else:
            num_canvases = len(infill)
            leading = sum(len(canvas.leading_token_ids) for canvas in infill)
            check_infill_positions(len(prompt_ids), leading, num_canvases, limits, field_name="prompt_token_ids")
        needed = len(prompt_ids) + leading + num_canvases * self.config.canvas_length
        if not self.runner.kv.fits_at_all(needed):
            raise ValueError(f"prompt_token_ids: {needed} positions need more KV blocks than the engine's cache "
                             "holds; shorten the prompt or lower max_new_tokens")
        self._sequences[request_id] = seq = SequenceState(
            request_id=request_id, prompt_ids=prompt_ids, params=params, num_canvases=num_canvases,
            infill=infill, added_at=time.monotonic())
        self.scheduler.add(seq)
        return request_id

    @property
    def request_limits(self) -> ModelLimits:
        """What one request may use here (the API checks submissions against the same limits, which workers
        publish): context positions per request (max_context, capped by the model's position table), the
        canvas length and the checkpoint's sampler defaults."""
        return ModelLimits(canvas_length=self.config.canvas_length,
                           max_positions=min(self.engine_config.max_context, self.config.max_position_embeddings),
                           sampling_defaults=self.generation_defaults.sampling_defaults())

    def abort(self, request_id: str) -> None:
        """Drop a request now (its KV slot is freed); the next step() reports it finished with "aborted".
        Unknown or already finished ids are ignored."""
        seq = self._sequences.get(request_id)
        if seq is not None:
            self._pending_outputs.append(self._finish(seq, "aborted", step=seq.canvas_step))

    def has_unfinished(self) -> bool:
        return bool(self._sequences or self._pending_outputs)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def kv_stats(self) -> PrefixCacheStats:
        """Prefix-cache counters (cumulative) and KV block occupancy (now), for metrics."""
        return self.runner.kv.stats()

    def generate(self, requests: Sequence[EngineRequest], max_steps: int | None = None,
                 on_output: Callable[[StepOutput], None] | None = None) -> list[RequestResult]:
        """Add `requests` (ids "0", "1", ... in order; the engine must hold no other requests) and step until
        all are finished; returns one `RequestResult` per request, in order.

        For scripts, benchmarks and tests: the serving worker drives `step()` itself. `on_output` sees every
        output as it comes (drafts included); `max_steps` bounds the loop (RuntimeError past it).
        """
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; it holds unfinished requests")
        ids = [self.add_request(request, request_id=str(index)) for index, request in enumerate(requests)]
        canvases: dict[str, list[tuple[int, ...]]] = {request_id: [] for request_id in ids}
        results: dict[str, RequestResult] = {}
        steps = 0
        while self.has_unfinished():
            if max_steps is not None and steps >= max_steps:
                raise RuntimeError(f"requests still unfinished after {max_steps} steps")
            outputs, steps = self.step(), steps + 1
            returned_at = time.perf_counter()
            for out in outputs:
                if on_output is not None:
                    on_output(out)
                if out.kind == "canvas":
                    canvases[out.request_id].append(out.token_ids)
                elif out.kind == "finished":
                    results[out.request_id] = RequestResult(out.request_id, tuple(canvases[out.request_id]),
                                                            out, returned_at)
        return [results[request_id] for request_id in ids]

    # ----- the step -----

    def step(self) -> list[StepOutput]:
        """Run one scheduler plan; returns drafts, committed canvases and finished requests of this step."""
        outputs, self._pending_outputs = self._pending_outputs, []
        plan = self.scheduler.schedule(now=time.monotonic())
        if plan.is_empty:
            self.last_step_stats = StepStats()
            return outputs
        touched = {w.request_id for w in plan.encodes} | {w.request_id for w in plan.denoises}
        step_outputs: list[StepOutput] = []
        try:
            result = self.runner.execute(plan, self._sequences)
            for work in plan.encodes:  # written now: name the completed blocks, release out-of-window ones
                self.scheduler.kv.after_write(work.request_id, work.token_ids)
            self._collect_outputs(result, step_outputs)
        except Exception as err:  # noqa: BLE001 (whatever failed, only this step's requests fail; the loop goes on)
            # Outputs collected before the failure stand (a request that finished keeps its finish).
            self.last_step_stats = StepStats()
            return outputs + step_outputs + self._fail_requests(touched, err)
        self.last_step_stats = StepStats(
            num_denoising_canvases=len(plan.denoises), num_encoder_tokens=plan.num_encoder_tokens,
            num_prefill_requests=sum(1 for work in plan.encodes if work.is_prefill),
            num_committed_canvases=sum(1 for work in plan.encodes if not work.is_prefill),
            committed_tokens=sum(len(o.token_ids) for o in step_outputs if o.kind == "canvas"),
            forward_seconds=result.forward_seconds)
        return outputs + step_outputs

    def _collect_outputs(self, result: Any, outputs: list[StepOutput]) -> None:
        """Append the drafts, committed canvases and finished requests of one executed plan to `outputs`."""
        now = time.monotonic()
        for canvas in result.canvases:
            seq = self._sequences[canvas.work.request_id]
            if seq.first_canvas_at is None:
                seq.first_canvas_at = now
            outputs.extend(self._after_denoise_step(seq, canvas))

    def _fail_requests(self, request_ids: set[str], err: Exception) -> list[StepOutput]:
        """Finish every still-running request of a failed step with "error"; the message names the failure
        (device out of memory, or an engine bug on an unusual configuration) so the job's error is clear."""
        message = f"the engine failed on this step ({type(err).__name__}: {err})"
        return [self._finish(self._sequences[request_id], "error", 0, message=message)
                for request_id in sorted(request_ids) if request_id in self._sequences]

    def _after_denoise_step(self, seq: SequenceState, canvas: CanvasResult) -> list[StepOutput]:
        work, outputs = canvas.work, []
        if seq.params.stream_drafts:
            outputs.append(StepOutput(request_id=seq.request_id, kind="draft", canvas_index=work.canvas_index,
                                      step=work.step, token_ids=tuple(canvas.argmax_ids)))
        if not (canvas.converged or work.step >= seq.params.max_denoising_steps):
            return outputs
        kept, reason = self._committed_ids(seq, canvas.argmax_ids)
        seq.generated_tokens += len(kept)
        logprobs = None
        if seq.params.logprobs is not None:  # `kept` is a prefix of the canvas: its first len(kept) positions
            logprobs = tuple(self.runner.committed_logprobs(work.slot, len(kept), seq.params.logprobs))
        outputs.append(StepOutput(request_id=seq.request_id, kind="canvas", canvas_index=work.canvas_index,
                                  step=work.step, token_ids=tuple(kept), logprobs=logprobs))
        if reason is not None:
            outputs.append(self._finish(seq, reason, work.step))
        else:
            self.scheduler.continue_with_next_canvas(seq, canvas.argmax_ids)
        return outputs

    def _committed_ids(self, seq: SequenceState, argmax_ids: list[int]) -> tuple[list[int], FinishReason | None]:
        """The ids a stopped canvas contributes and whether the request ends with it.

        Open-ended: cut to the remaining max_new_tokens; everything after the first stop token is padding and
        dropped (the stop token is kept). Infill canvases are returned whole and end with "stop" after the last.
        """
        is_last = seq.canvas_index + 1 >= seq.num_canvases
        if seq.infill is not None:
            return list(argmax_ids), ("stop" if is_last else None)
        kept = argmax_ids[:seq.params.max_new_tokens - seq.generated_tokens]
        for index, token in enumerate(kept):
            if token in self._stop_ids:
                return kept[:index + 1], "stop"
        return kept, ("length" if is_last else None)

    def _finish(self, seq: SequenceState, reason: FinishReason, step: int, message: str = "") -> StepOutput:
        self.scheduler.finish(seq)
        del self._sequences[seq.request_id]
        now = time.monotonic()
        admitted = seq.admitted_at if seq.admitted_at is not None else now
        canvases = seq.canvas_index + 1 if seq.total_steps else 0
        stats = RequestStats(
            prompt_tokens=len(seq.prompt_ids), generated_tokens=seq.generated_tokens, canvases=canvases,
            denoising_steps=seq.total_steps, steps_per_canvas=seq.total_steps / canvases if canvases else 0.0,
            queue_seconds=admitted - seq.added_at,
            prefill_seconds=(seq.first_canvas_at or now) - admitted, run_seconds=now - admitted,
            cached_prompt_tokens=seq.cached_prompt_tokens)
        return StepOutput(request_id=seq.request_id, kind="finished", canvas_index=seq.canvas_index, step=step,
                          token_ids=(), finish_reason=reason, stats=stats, error=message or None)

    # ----- validation -----

    def _prompt_ids(self, req: EngineRequest) -> tuple[int, ...]:
        given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(req, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
        if req.prompt_token_ids is not None:
            ids = tuple(req.prompt_token_ids)
        else:
            ids = tuple(self.tokenizer.encode_prompt(prompt=req.prompt, messages=req.messages))
        if not ids:
            raise ValueError("the prompt is empty: it must encode to at least one token")
        self._check_ids(ids, "prompt_token_ids")
        return ids

    def _check_ids(self, ids: tuple[int, ...], what: str) -> None:
        vocab = self.config.vocab_size
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{what}: token ids must be integers in [0, {vocab}); got {bad[:5]}")

    def _validated_infill(self, req: EngineRequest) -> tuple[Any, ...] | None:
        if req.infill is None:
            return None
        infill, length = tuple(req.infill), self.config.canvas_length
        if not infill:
            raise ValueError("infill must hold at least one canvas (or be None for open-ended generation)")
        for index, canvas in enumerate(infill):
            if len(canvas.token_ids) != length or len(canvas.is_fixed) != length:
                raise ValueError(f"infill[{index}]: token_ids and is_fixed must both have canvas_length={length} "
                                 f"entries (got {len(canvas.token_ids)} and {len(canvas.is_fixed)})")
            if not all(isinstance(flag, bool) for flag in canvas.is_fixed):
                raise ValueError(f"infill[{index}].is_fixed must hold booleans")
            fixed = tuple(t for t, flag in zip(canvas.token_ids, canvas.is_fixed, strict=True) if flag)
            self._check_ids(fixed + tuple(canvas.leading_token_ids), f"infill[{index}]")
        return infill
