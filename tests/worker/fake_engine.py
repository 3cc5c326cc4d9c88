"""`DeterministicFakeEngine`: a small, real implementation of the worker's engine Protocol
(`worker.protocols.EngineLike`) for in-process tests of the worker runtime and engine loop.

No model: every request runs `ceil(max_new_tokens / canvas_length)` canvases of `steps_per_canvas` steps each;
a canvas commits `canvas_length` ids taken in order from `vocabulary_ids` (the last canvas is cut to
max_new_tokens), so the expected result of a job is known without running anything. It reports drafts when
asked, "aborted" ends for aborted requests, a device-error end for requests whose prompt contains
`ERROR_PROMPT`, and keeps the engine's contracts: `add_request` raises ValueError for what it cannot run,
`step` returns the outputs of one step, one thread drives it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from dgtext.request_rules import ModelLimits
from dgtext.tokenizer import PromptTokenizer
from engine.block_manager import PrefixCacheStats
from engine.types import EngineRequest, FinishReason, GenerationDefaults, RequestStats, StepOutput, StepStats

DGTINY = Path(__file__).resolve().parents[2] / "models" / "dgtiny"
ERROR_PROMPT = "make the device fail"


@dataclass(frozen=True)
class FakeModelConfig:
    canvas_length: int


@dataclass
class _FakeRequest:
    request_id: str
    num_canvases: int
    max_new_tokens: int
    stream_drafts: bool
    fails: bool
    canvas_index: int = 0
    step: int = 0
    generated: int = 0
    total_steps: int = 0
    added_at: float = field(default_factory=time.monotonic)


class DeterministicFakeEngine:
    """See the module doc. `step_seconds` sleeps in every step that has work (to keep jobs in flight)."""

    def __init__(self, canvas_length: int = 8, steps_per_canvas: int = 2, step_seconds: float = 0.0,
                 max_context: int = 512) -> None:
        self.tokenizer = PromptTokenizer.from_dir(DGTINY)
        self.config = FakeModelConfig(canvas_length=canvas_length)
        self.generation_defaults = GenerationDefaults(stop_token_ids=self.tokenizer.eos_ids, max_new_tokens=24)
        self.steps_per_canvas, self.step_seconds, self.max_context = steps_per_canvas, step_seconds, max_context
        self.vocabulary_ids = tuple(self.tokenizer.encode(" the quick brown fox jumps over the lazy dog" * 40))
        self.last_step_stats = StepStats()
        self._requests: dict[str, _FakeRequest] = {}
        self._pending: list[StepOutput] = []

    @property
    def request_limits(self) -> ModelLimits:
        """What one request may use here (published with the worker's heartbeat, as the real engine's)."""
        return ModelLimits(canvas_length=self.config.canvas_length, max_positions=self.max_context,
                           sampling_defaults=self.generation_defaults.sampling_defaults())

    def expected_ids(self, max_new_tokens: int) -> list[int]:
        """The ids a request with this max_new_tokens commits."""
        return list(self.vocabulary_ids[:max_new_tokens])

    def add_request(self, req: EngineRequest, request_id: str | None = None) -> str:
        request_id = request_id or f"fake-{len(self._requests)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        prompt_ids = self.tokenizer.encode_prompt(req.prompt, req.messages) if req.prompt_token_ids is None \
            else list(req.prompt_token_ids)
        max_new_tokens = req.params.max_new_tokens or self.generation_defaults.max_new_tokens
        num_canvases = math.ceil(max_new_tokens / self.config.canvas_length)
        if len(prompt_ids) + num_canvases * self.config.canvas_length > self.max_context:
            raise ValueError(f"prompt too long for the fake engine's max_context of {self.max_context}")
        self._requests[request_id] = _FakeRequest(
            request_id, num_canvases, max_new_tokens, req.params.stream_drafts,
            fails=ERROR_PROMPT in (req.prompt or ""))
        return request_id

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self._pending.append(self._finished(request, "aborted"))

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._pending)

    def num_waiting(self) -> int:
        return 0

    def num_running(self) -> int:
        return len(self._requests)

    def kv_stats(self) -> PrefixCacheStats:
        """No KV cache: nothing queried, nothing held (one block pool of one block, for the gauges)."""
        return PrefixCacheStats(query_tokens=0, hit_tokens=0, evicted_blocks=0, full_blocks_used=0,
                                full_blocks_total=1, sliding_blocks_used=0, sliding_blocks_total=1)

    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        if self._requests and self.step_seconds:
            time.sleep(self.step_seconds)
        for request in list(self._requests.values()):
            outputs.extend(self._advance(request))
        self.last_step_stats = StepStats(num_denoising_canvases=len(self._requests), forward_seconds=self.step_seconds)
        return outputs

    def _advance(self, request: _FakeRequest) -> list[StepOutput]:
        if request.fails:
            del self._requests[request.request_id]
            return [self._finished(request, "error", error="fake device error: out of memory")]
        request.step += 1
        request.total_steps += 1
        length = self.config.canvas_length
        start = request.canvas_index * length
        ids = self.vocabulary_ids[start:start + length]
        outputs = []
        if request.stream_drafts:
            outputs.append(StepOutput(request.request_id, "draft", request.canvas_index, request.step, ids))
        if request.step < self.steps_per_canvas:
            return outputs
        kept = ids[:request.max_new_tokens - request.generated]
        request.generated += len(kept)
        outputs.append(StepOutput(request.request_id, "canvas", request.canvas_index, request.step, kept))
        if request.canvas_index + 1 >= request.num_canvases:
            del self._requests[request.request_id]
            outputs.append(self._finished(request, "length"))
        else:
            request.canvas_index, request.step = request.canvas_index + 1, 0
        return outputs

    def _finished(self, request: _FakeRequest, reason: FinishReason, error: str | None = None) -> StepOutput:
        canvases = request.canvas_index + 1 if request.total_steps else 0
        run_s = time.monotonic() - request.added_at
        stats = RequestStats(prompt_tokens=0, generated_tokens=request.generated, canvases=canvases,
                             denoising_steps=request.total_steps,
                             steps_per_canvas=request.total_steps / canvases if canvases else 0.0,
                             queue_seconds=0.0, prefill_seconds=0.0, run_seconds=run_s)
        return StepOutput(request.request_id, "finished", request.canvas_index, request.step, (),
                          finish_reason=reason, stats=stats, error=error)
