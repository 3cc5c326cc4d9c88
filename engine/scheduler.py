"""Step-level continuous batching in plain Python (no torch): which requests encode and which canvases denoise.

A request moves WAITING -> ENCODING -> DENOISING -> (ENCODING -> DENOISING)* -> FINISHED:
- ENCODING: tokens are waiting to be written into its KV slot before its next canvas can start: the prompt
  (prefill, possibly chunked over several steps) or a finished canvas (commit), plus any infill leading text.
- DENOISING: its canvas runs one decoder step per engine step until the sampler stops it.

`Scheduler.schedule()` builds the next `StepPlan` under three budgets: `max_tokens_per_forward` (padded tokens
of the step's encode rows: rows x the widest row, see `Scheduler._encode_width`; `group_encode_rows` in
engine/row_groups.py then splits them into forwards of similar row lengths, which only lowers what is
computed), `max_canvases_in_flight`
(running requests; each has at most one canvas, and one row of the runner's canvas state, its "slot") and
the KV blocks (`engine/block_manager.py`): a request is admitted only when the full-layer pool can hold every
position it will ever write (free blocks plus cached blocks eviction can take), after reusing its longest
cached prefix, so it never runs out of blocks mid-canvas. Admission is FIFO: a request that does not fit
waits, and so do the ones behind it. The one exception: a request whose next uncached prefix block is being
written by a running request's prefill is *held back* (skipped, still waiting, holding nothing) until that
block is written, so requests arriving together with a shared prompt encode it once; it re-queries every
step, so a writer that is cancelled or fails (its pending blocks are dropped) releases it at once.
A request whose encoding completes in a step also denoises its first canvas step in that same step, so a
commit and the next canvas share one engine step; a request whose
whole prompt is cached starts denoising in the step that admits it. Requests added while others are
mid-canvas are admitted at the next `schedule()`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.row_groups import group_encode_rows
from engine.types import InfillCanvas, ResolvedParams


class Phase(enum.Enum):
    WAITING = "waiting"
    ENCODING = "encoding"
    DENOISING = "denoising"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    """Engine-internal progress of one request (never serialised). Mutated by the scheduler and the engine."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: ResolvedParams
    num_canvases: int
    infill: tuple[InfillCanvas, ...] | None
    added_at: float
    phase: Phase = Phase.WAITING
    slot: int | None = None
    pending_encode: list[int] = field(default_factory=list)  # tokens to cache before the next canvas starts
    num_cached: int = 0  # tokens already in the slot's cache == position of the next encoded token
    canvas_index: int = 0
    canvas_step: int = 0  # denoising steps run on the current canvas
    canvas_start: int = 0  # absolute position of the current canvas's first token
    total_steps: int = 0
    generated_tokens: int = 0
    admitted_at: float | None = None
    first_canvas_at: float | None = None
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_hashes: list[bytes] | None = None  # block hashes of the known tokens, computed once while waiting

    def __post_init__(self) -> None:
        leading = self.infill[0].leading_token_ids if self.infill else ()
        self.pending_encode = [*self.prompt_ids, *leading]

    def total_positions(self, canvas_length: int) -> int:
        """Every position the request will write or denoise: prompt, infill leading text, all canvases."""
        leading = sum(len(canvas.leading_token_ids) for canvas in self.infill or ())
        return len(self.prompt_ids) + leading + self.num_canvases * canvas_length


@dataclass(frozen=True)
class EncodeWork:
    """A run of tokens to encode (causal, writes the cache) for one request, at positions start.. onwards."""

    request_id: str
    slot: int
    token_ids: tuple[int, ...]
    start_position: int
    is_prefill: bool  # prompt (and first leading text) rather than a committed canvas


@dataclass(frozen=True)
class DenoiseWork:
    """One decoder step of one canvas."""

    request_id: str
    slot: int
    canvas_index: int
    step: int  # 1-based step this forward performs
    canvas_start: int  # position of the canvas's first token == tokens in the slot's cache

    @property
    def starts_canvas(self) -> bool:
        return self.step == 1


@dataclass(frozen=True)
class StepPlan:
    """Everything one engine step runs: the encoder forwards over `encodes` (`encode_groups`), then one
    decoder forward over `denoises`. `admitted` are the requests that got a KV slot in this step."""

    encodes: tuple[EncodeWork, ...] = ()
    denoises: tuple[DenoiseWork, ...] = ()
    admitted: tuple[str, ...] = ()

    @property
    def num_encoder_tokens(self) -> int:
        return sum(len(work.token_ids) for work in self.encodes)

    @property
    def encode_groups(self) -> tuple[tuple[EncodeWork, ...], ...]:
        """`encodes` split into the encoder forwards the runner runs (`group_encode_rows`)."""
        return group_encode_rows(self.encodes)

    @property
    def num_padded_encoder_tokens(self) -> int:
        """Tokens the encoder forwards compute: per group, rows x its widest row (the runner pads on the
        right); at most rows x the widest row of the step, which `max_tokens_per_forward` bounds."""
        return sum(len(group) * len(group[0].token_ids) for group in self.encode_groups)

    @property
    def is_empty(self) -> bool:
        return not self.encodes and not self.denoises


class Scheduler:
    """FIFO admission over waiting/running queues; owns the canvas-state rows ("slots", plain ints) and,
    through `kv`, the KV blocks."""

    def __init__(self, kv: BlockManager, max_canvases_in_flight: int, max_tokens_per_forward: int,
                 canvas_length: int, max_encode_row: int | None = None) -> None:
        if max_canvases_in_flight <= 0 or max_tokens_per_forward <= 0 or canvas_length <= 0:
            raise ValueError("Scheduler needs at least one canvas in flight, one token per forward and a canvas "
                             f"(got {max_canvases_in_flight}, {max_tokens_per_forward}, {canvas_length})")
        self.kv, self.canvas_length = kv, canvas_length
        self.max_running = max_canvases_in_flight
        self.max_tokens_per_forward = max_tokens_per_forward
        # Longest encode chunk of one row: the sliding pool is sized for a window plus one such chunk.
        self.max_encode_row = min(max_encode_row or max_tokens_per_forward, max_tokens_per_forward)
        self.free_slots: deque[int] = deque(range(max_canvases_in_flight))
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []

    def add(self, seq: SequenceState) -> None:
        seq.phase = Phase.WAITING
        self.waiting.append(seq)

    def schedule(self, now: float) -> StepPlan:
        """Plan the next step and advance the plan's bookkeeping (cached positions, canvas steps).

        The caller must run the returned plan: encode chunks are counted as cached once planned (and must
        report them to `kv.after_write` once written).
        """
        encoding = [seq for seq in self.running if seq.phase is Phase.ENCODING]
        room = min(self.max_running - len(self.running), len(self.free_slots))
        newcomers = [self.waiting[i] for i in range(min(room, len(self.waiting)))]
        needs = [len(seq.pending_encode) for seq in encoding + newcomers]
        width = self._encode_width(needs) if needs else 0
        max_rows = self.max_tokens_per_forward // width if width else 0
        encodes: list[EncodeWork] = []
        for seq in encoding[:max_rows]:
            self._take_encode_chunk(seq, width, encodes)
        admitted: list[str] = []
        for seq in list(self.waiting):
            if not (len(encodes) < max_rows and len(self.running) < self.max_running and self.free_slots):
                break
            if self._held_back(seq):
                continue  # its shared prefix is being written: it hits it a step later instead of recomputing it
            if not self._admit(seq, now):
                break  # FIFO: the first request that does not fit waits for blocks, and so does everyone behind it
            self.waiting.remove(seq)
            admitted.append(seq.request_id)
            if seq.pending_encode:
                self._take_encode_chunk(seq, width, encodes)
        denoises = [self._next_denoise_step(seq) for seq in self.running if seq.phase is Phase.DENOISING]
        return StepPlan(encodes=tuple(encodes), denoises=tuple(denoises), admitted=tuple(admitted))

    def _held_back(self, seq: SequenceState) -> bool:
        """Whether a waiting request's next uncached prefix block is pending (a running request writes it)."""
        if seq.prefix_hashes is None:  # its known tokens do not change while it waits
            seq.prefix_hashes = self.kv.prefix_hashes(seq.pending_encode)
        return self.kv.waits_for_pending(seq.prefix_hashes)

    def _admit(self, seq: SequenceState, now: float) -> bool:
        """Reserve the request's KV blocks (reusing its cached prefix) and a canvas-state row."""
        cached = self.kv.try_admit(seq.request_id, seq.pending_encode, seq.total_positions(self.canvas_length),
                                   hashes=seq.prefix_hashes)
        if cached is None:
            return False
        seq.prefix_hashes = None
        seq.slot = self.free_slots.popleft()
        seq.phase = Phase.ENCODING
        seq.admitted_at = now
        seq.cached_prompt_tokens = min(cached, len(seq.prompt_ids))
        seq.num_cached = cached
        del seq.pending_encode[:cached]
        if not seq.pending_encode:  # the whole prompt was cached: the first canvas starts now
            self._start_denoising(seq)
        self.running.append(seq)
        return True

    def continue_with_next_canvas(self, seq: SequenceState, committed_ids: list[int]) -> None:
        """After a canvas stops and the request goes on: its ids (and the next infill leading text) must be
        encoded before the next canvas starts."""
        seq.canvas_index += 1
        leading = seq.infill[seq.canvas_index].leading_token_ids if seq.infill else ()
        seq.pending_encode = [*committed_ids, *leading]
        seq.phase = Phase.ENCODING

    def finish(self, seq: SequenceState) -> int | None:
        """Remove a request (finished or aborted) from the queues; returns the KV slot it freed, if any."""
        if seq.phase is Phase.WAITING:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        seq.phase = Phase.FINISHED
        slot, seq.slot = seq.slot, None
        if slot is not None:
            self.free_slots.append(slot)
        self.kv.free(seq.request_id)
        return slot

    def _encode_width(self, needs: list[int]) -> int:
        """Row width of this step's encoder forward, given the pending tokens of every candidate row
        (running encoders, then the waiting requests that could be admitted).

        The forward pads every row to the widest, so rows x width (not the sum of row lengths) is what
        `max_tokens_per_forward` bounds. The width follows the shortest need, so that rows of different
        lengths share a forward without padding the short ones to the long one; longer rows are chunked at
        that width and go on in the next step. It never drops below `max_tokens_per_forward //
        max_running` (a short commit must not slice a long prompt into tiny forwards; every running
        request still fits at that width), and never exceeds the longest need or the budget."""
        floor = max(1, self.max_tokens_per_forward // self.max_running)
        longest = min(max(needs), self.max_encode_row)
        return max(1, min(longest, max(min(needs), floor)))

    def _take_encode_chunk(self, seq: SequenceState, budget: int, encodes: list[EncodeWork]) -> None:
        if seq.slot is None:
            raise RuntimeError(f"request {seq.request_id} is encoding without a KV slot")
        chunk = seq.pending_encode[:budget]
        self.kv.prepare_write(seq.request_id, seq.num_cached, len(chunk))
        encodes.append(EncodeWork(request_id=seq.request_id, slot=seq.slot, token_ids=tuple(chunk),
                                  start_position=seq.num_cached, is_prefill=seq.canvas_index == 0))
        seq.num_cached += len(chunk)
        del seq.pending_encode[:len(chunk)]
        if not seq.pending_encode:
            Scheduler._start_denoising(seq)

    @staticmethod
    def _start_denoising(seq: SequenceState) -> None:
        seq.phase = Phase.DENOISING
        seq.canvas_step = 0
        seq.canvas_start = seq.num_cached

    @staticmethod
    def _next_denoise_step(seq: SequenceState) -> DenoiseWork:
        if seq.slot is None:
            raise RuntimeError(f"request {seq.request_id} is denoising without a KV slot")
        seq.canvas_step += 1
        seq.total_steps += 1
        return DenoiseWork(request_id=seq.request_id, slot=seq.slot, canvas_index=seq.canvas_index,
                           step=seq.canvas_step, canvas_start=seq.canvas_start)
