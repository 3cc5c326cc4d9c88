"""Model runner: a StepPlan -> padded tensors -> encoder forwards -> one decoder forward -> the sampler.

# B canvases in the decoder forward, R rows in the encoder forward, T longest encode row, C canvas length,
# V vocab, D hidden, N canvas-state rows (max canvases in flight), Nf / Ns block-table widths

The runner owns all device memory: the paged KV cache (its block pools sized once from a byte budget, see
`plan_kv_pools`) and the per-slot canvas state the sampler carries between steps (current canvas ids,
previous argmax, stable-step counter, self-conditioning embedding, infill clamps). State is indexed by slot
(a canvas-state row), so canvases can join and leave the batch at any step. Block tables are built on the
host from the block manager's lists (`engine/block_manager.py`) and copied with the step's other inputs. A step makes at most one device-to-host read: the argmax of every canvas in the
decoder batch packed with its converged flag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine import rng
from engine.block_manager import BlockManager
from engine.compiled_step import EncodeRegion, StepRegion
from engine.config import FULL, SLIDING, ModelConfig
from engine.kv_cache import BlockTables, PagedKVCache, blocks_for
from engine.model.transformer import DiffusionGemmaModel, RowGroups
from engine.row_groups import decoder_row_groups
from engine.sampler import (
    ChunkKernels,
    CompiledWithFallback,
    SamplerInputs,
    initial_canvas,
    temperature_at,
)
from engine.scheduler import DenoiseWork, EncodeWork, SequenceState, StepPlan
from engine.types import MAX_LOGPROBS, EngineConfig, TokenLogprob

_CPU_DEFAULT_KV_BYTES = 1 << 30  # without a budget on CPU: 1 GiB of host memory for the cache


@dataclass(frozen=True)
class CanvasResult:
    """Host-side outcome of one decoder step of one canvas."""

    work: DenoiseWork
    argmax_ids: list[int]  # the draft of this step; the committed ids if the canvas stops now
    converged: bool


@dataclass(frozen=True)
class RunResult:
    canvases: list[CanvasResult]
    forward_seconds: float


def kv_budget_bytes(engine_config: EngineConfig, device: torch.device) -> int:
    """The KV byte budget: explicit, else a fraction of free CUDA memory, else a fixed CPU default."""
    if engine_config.kv_cache_bytes is not None:
        return engine_config.kv_cache_bytes
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return int(free_bytes * engine_config.kv_cache_memory_fraction)
    return _CPU_DEFAULT_KV_BYTES


@dataclass(frozen=True)
class KVPoolSizes:
    """How one byte budget splits into blocks (see `plan_kv_pools`)."""

    full_blocks: int
    sliding_blocks: int
    max_encode_row: int  # longest encode chunk of one row (the sliding reservation covers one)
    sliding_per_request: int  # sliding blocks one running request can hold at once
    sliding_tail_blocks: int = 0  # of sliding_blocks: what the capped full pool left, keeping window tails


def plan_kv_pools(config: ModelConfig, engine_config: EngineConfig, dtype: torch.dtype, budget: int) -> KVPoolSizes:
    """Split `budget` bytes into the sliding pool and the full pool.

    A running request holds at most `sliding_per_request` sliding blocks: the window before its context end
    plus one encode chunk of at most `max_encode_row` (= `sliding_chunk_tokens`) tokens. The sliding pool holds
    that for every canvas in flight, plus one more window each when that costs at most an eighth of the budget
    (so cached prefix tails survive a while); the rest of the budget is the full pool, capped at four
    `max_context` requests per canvas in flight (more would only serve the prefix cache; the cap keeps a
    default budget from reserving memory a small model never uses). What the cap leaves of the budget keeps
    window tails: a prefix hit at block h needs the sliding blocks of the window before h, so the sliding pool
    grows by up to one block per full block (more could never be read), and by at most the full pool's bytes.
    """
    bs, running = engine_config.block_size, engine_config.max_canvases_in_flight
    block_bytes = PagedKVCache.block_bytes(config, bs, dtype)
    has_sliding = SLIDING in config.layer_types
    window_blocks = PagedKVCache.sliding_read_blocks(config.sliding_window, bs)
    max_encode_row = engine_config.sliding_chunk_tokens if has_sliding else engine_config.max_tokens_per_forward
    per_request = window_blocks + blocks_for(max_encode_row, bs) + 1 if has_sliding else 0
    sliding_blocks = running * per_request if has_sliding else 0
    if has_sliding and running * window_blocks * block_bytes[SLIDING] <= budget // 8:
        sliding_blocks += running * window_blocks
    context_blocks = blocks_for(engine_config.max_context, bs)
    cap = 4 * running * context_blocks
    remaining = budget - sliding_blocks * block_bytes[SLIDING]
    full_blocks = min(cap, remaining // block_bytes[FULL]) if block_bytes[FULL] else cap
    tails = 0
    if has_sliding and full_blocks == cap and remaining >= 0:
        left = min(remaining - full_blocks * block_bytes[FULL], full_blocks * block_bytes[FULL])
        tails = min(left // block_bytes[SLIDING], full_blocks)
    if remaining < 0 or full_blocks < context_blocks:
        need = context_blocks * block_bytes[FULL] + running * per_request * block_bytes[SLIDING]
        raise ValueError(f"a KV budget of {budget} bytes holds no request: one request of max_context "
                         f"{engine_config.max_context} with {running} in flight needs {need} bytes; raise "
                         "kv_cache_bytes or lower max_context")
    return KVPoolSizes(full_blocks=full_blocks, sliding_blocks=sliding_blocks + tails, max_encode_row=max_encode_row,
                       sliding_per_request=per_request, sliding_tail_blocks=tails)


class ModelRunner:
    """Runs plans on one model; holds the paged KV cache, the block manager and the per-slot sampler state."""

    def __init__(self, model: DiffusionGemmaModel, config: ModelConfig, engine_config: EngineConfig) -> None:
        weight = model.embed_tokens.weight
        self.model, self.config, self.engine_config = model, config, engine_config
        self.device: torch.device = weight.device
        self.dtype: torch.dtype = weight.dtype
        self.pools = plan_kv_pools(config, engine_config, self.dtype, kv_budget_bytes(engine_config, self.device))
        self.num_slots = engine_config.max_canvases_in_flight
        self.block_size = engine_config.block_size
        self.cache = PagedKVCache(config, self.pools.full_blocks, self.pools.sliding_blocks, self.block_size,
                                  self.device, self.dtype, max_context=engine_config.max_context)
        self.kv = BlockManager(self.pools.full_blocks, self.pools.sliding_blocks, self.block_size,
                               config.sliding_window, SLIDING in config.layer_types,
                               engine_config.enable_prefix_caching, salt=f"{config!r}|{self.dtype}|{self.block_size}")
        slots, length = self.num_slots, config.canvas_length
        self.canvas_ids = torch.zeros(slots, length, dtype=torch.int64, device=self.device)
        self.prev_argmax = torch.full((slots, length), -1, dtype=torch.int64, device=self.device)
        self.stable_steps = torch.zeros(slots, dtype=torch.int64, device=self.device)
        self.is_fixed = torch.zeros(slots, length, dtype=torch.bool, device=self.device)
        self.fixed_ids = torch.zeros(slots, length, dtype=torch.int64, device=self.device)
        self.sc_embeds = torch.zeros(slots, length, config.hidden_size, dtype=self.dtype, device=self.device)
        self._canvas_offsets = torch.arange(length, dtype=torch.int64, device=self.device)
        # The last step's log-probabilities per slot, read on the host only when a canvas commits.
        self.logprob_selected = torch.zeros(slots, length, dtype=torch.float32, device=self.device)
        self.logprob_top_ids = torch.zeros(slots, length, MAX_LOGPROBS, dtype=torch.int64, device=self.device)
        self.logprob_top = torch.zeros(slots, length, MAX_LOGPROBS, dtype=torch.float32, device=self.device)
        compile_sampler = engine_config.compile_sampler
        if compile_sampler is None:
            compile_sampler = self.device.type == "cuda"
        self.chunk_kernels = CompiledWithFallback() if compile_sampler else ChunkKernels()
        compile_step = engine_config.compile_step
        if compile_step is None:
            compile_step = self.device.type == "cuda"
        self.step_region = StepRegion(model, self.cache, compile_step, engine_config.vocab_chunk_size,
                                      self.chunk_kernels)
        compile_encoder = compile_step if engine_config.compile_encoder is None else engine_config.compile_encoder
        self.encode_region = EncodeRegion(model, self.cache, compile_encoder)

    def block_tables(self, request_ids: list[str], context_ends: list[int], write_ends: list[int]) -> BlockTables:
        """Tables for rows whose cached context ends at `context_ends` and whose forward writes up to (not
        including) `write_ends` (= context_ends for a decoder forward). Host lists -> one copy each; the full
        table covers every position read or written, the sliding table the window plus the writes."""
        bs, kv = self.block_size, self.kv
        full_scratch, sliding_scratch = self.cache.scratch[FULL], self.cache.scratch[SLIDING]
        full_width = max(blocks_for(end, bs) for end in write_ends)
        read_blocks = PagedKVCache.sliding_read_blocks(self.config.sliding_window, bs)
        firsts = [kv.window_start_block(end) for end in context_ends]
        sliding_width = max(max(blocks_for(w, bs) - f, read_blocks) for w, f in zip(write_ends, firsts, strict=True))
        full_rows, sliding_rows = [], []
        for request_id, first in zip(request_ids, firsts, strict=True):
            state = kv.requests[request_id]
            full = state.full[:full_width]
            full_rows.append(full + [full_scratch] * (full_width - len(full)))
            sliding_rows.append([state.sliding.get(first + j, sliding_scratch) for j in range(sliding_width)])
        def longs(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return BlockTables(full=longs(full_rows), sliding=longs(sliding_rows), sliding_first=longs(firsts))

    @torch.inference_mode()
    def execute(self, plan: StepPlan, sequences: dict[str, SequenceState]) -> RunResult:
        """Run one step: the encoder forwards for `plan.encodes` (one per `plan.encode_groups` group), then
        one decoder forward and the sampler for `plan.denoises`. Returns the host copy of every canvas's argmax
        and converged flag."""
        started = time.perf_counter()
        for group in plan.encode_groups:  # one encoder forward per group of similar row lengths
            self._encode(group)
        canvases: list[CanvasResult] = []
        if plan.denoises:
            starting = [work for work in plan.denoises if work.starts_canvas]
            if starting:
                self._start_canvases(starting, sequences)
            canvases = self._denoise(plan.denoises, sequences)
        return RunResult(canvases=canvases, forward_seconds=time.perf_counter() - started)

    def _encode(self, encodes: tuple[EncodeWork, ...]) -> None:
        width = max(len(work.token_ids) for work in encodes)
        pad = self.config.pad_token_id
        ids = [list(work.token_ids) + [pad] * (width - len(work.token_ids)) for work in encodes]
        valid = [[True] * len(work.token_ids) + [False] * (width - len(work.token_ids)) for work in encodes]
        starts = [work.start_position for work in encodes]
        positions = torch.tensor(starts, device=self.device).unsqueeze(1) + torch.arange(width, device=self.device)
        tables = self.block_tables([work.request_id for work in encodes], starts,
                                   [work.start_position + len(work.token_ids) for work in encodes])
        inputs = {"token_ids": torch.tensor(ids, device=self.device), "positions": positions,
                  "token_valid": torch.tensor(valid, device=self.device), "full_table": tables.full,
                  "sliding_table": tables.sliding, "sliding_first": tables.sliding_first}
        self.encode_region.run(inputs, max(starts))

    def _start_canvases(self, works: list[DenoiseWork], sequences: dict[str, SequenceState]) -> None:
        """Fresh canvases: uniform noise (clamped where infill fixes ids), no history, no self-conditioning."""
        length = self.config.canvas_length
        keys, fixed_rows, id_rows = [], [], []
        for work in works:
            seq = sequences[work.request_id]
            keys.append(rng.stream_key(seq.params.seed, work.canvas_index, 0, rng.STREAM_INITIAL_CANVAS))
            if seq.infill is not None:
                canvas = seq.infill[work.canvas_index]
                fixed_rows.append(list(canvas.is_fixed))
                id_rows.append(list(canvas.token_ids))
            else:
                fixed_rows.append([False] * length)
                id_rows.append([0] * length)
        slots = torch.tensor([work.slot for work in works], device=self.device)
        is_fixed = torch.tensor(fixed_rows, dtype=torch.bool, device=self.device)
        fixed_ids = torch.tensor(id_rows, dtype=torch.int64, device=self.device)
        keys_t = torch.tensor(keys, dtype=torch.int64, device=self.device)
        self.canvas_ids[slots] = initial_canvas(keys_t, length, self.config.vocab_size, is_fixed, fixed_ids)
        self.is_fixed[slots] = is_fixed
        self.fixed_ids[slots] = fixed_ids
        self.prev_argmax[slots] = -1
        self.stable_steps[slots] = 0
        self.sc_embeds[slots] = 0

    def _sampler_inputs(self, works: tuple[DenoiseWork, ...], sequences: dict[str, SequenceState]
                        ) -> SamplerInputs:
        params = [sequences[work.request_id].params for work in works]
        pairs = list(zip(works, params, strict=True))
        # A greedy request (temperature 0) keeps the schedule's temperature for everything but the draw.
        temps = [temperature_at(w.step, p.max_denoising_steps, p.t_min, p.t_max) * (p.temperature or 1.0)
                 for w, p in pairs]
        sample = [rng.stream_key(p.seed, w.canvas_index, w.step, rng.STREAM_SAMPLE) for w, p in pairs]
        renoise = [rng.stream_key(p.seed, w.canvas_index, w.step, rng.STREAM_RENOISE) for w, p in pairs]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=self.device)

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return SamplerInputs(
            temperature=floats(temps),
            entropy_bound=floats([p.entropy_bound for p in params]),
            confidence_threshold=floats([p.confidence_threshold for p in params]),
            stability_threshold=longs([p.stability_threshold for p in params]),
            may_stop_early=torch.tensor([not p.fixed_steps for p in params], device=self.device),
            sample_keys=longs(sample),
            renoise_keys=longs(renoise),
            greedy=(torch.tensor([p.temperature == 0 for p in params], device=self.device)
                    if any(p.temperature == 0 for p in params) else None),
            top_k=longs([p.top_k for p in params]) if any(p.truncates_draw for p in params) else None,
            top_p=floats([p.top_p for p in params]) if any(p.truncates_draw for p in params) else None,
        )

    def _denoise(self, works: tuple[DenoiseWork, ...], sequences: dict[str, SequenceState]) -> list[CanvasResult]:
        """One decoder step of `works`, run in order of context length so that the full-attention layers
        read each run of rows only up to its own longest context (`decoder_row_groups`); the results come
        back in the order of `works`. The compiled step reads one padded table for every row, so it takes the
        rows as they come."""
        if self.step_region.compiled:
            return self._denoise_rows(works, sequences, None)
        order, row_groups = decoder_row_groups([work.canvas_start for work in works], self.config.canvas_length,
                                               self.block_size)
        results = self._denoise_rows(tuple(works[row] for row in order), sequences, row_groups)
        by_row = dict(zip(order, results, strict=True))
        return [by_row[row] for row in range(len(works))]

    def _denoise_rows(self, works: tuple[DenoiseWork, ...], sequences: dict[str, SequenceState],
                      row_groups: RowGroups | None) -> list[CanvasResult]:
        slots = torch.tensor([work.slot for work in works], device=self.device)
        starts_host = [work.canvas_start for work in works]
        starts = torch.tensor(starts_host, device=self.device)
        positions = starts.unsqueeze(1) + self._canvas_offsets  # [B, C]
        tables = self.block_tables([work.request_id for work in works], starts_host, starts_host)
        sampler = self._sampler_inputs(works, sequences)
        inputs = {"canvas_ids": self.canvas_ids[slots], "positions": positions, "context_lens": starts,
                  "full_table": tables.full, "sliding_table": tables.sliding, "sliding_first": tables.sliding_first,
                  "sc_embeds": self.sc_embeds[slots], "prev_argmax": self.prev_argmax[slots],
                  "stable_steps": self.stable_steps[slots], "is_fixed": self.is_fixed[slots],
                  "fixed_ids": self.fixed_ids[slots],
                  **{name: value for name, value in sampler.__dict__.items() if value is not None}}
        wants_logprobs = any(sequences[work.request_id].params.logprobs is not None for work in works)
        out = self.step_region.run(inputs, max(starts_host), MAX_LOGPROBS if wants_logprobs else None, row_groups)
        self.sc_embeds[slots] = out["sc_embeds"]
        if wants_logprobs:
            self.logprob_selected[slots] = out["logprob_selected"]
            self.logprob_top_ids[slots] = out["logprob_top_ids"]
            self.logprob_top[slots] = out["logprob_top"]
        self.canvas_ids[slots] = out["next_canvas"]
        self.prev_argmax[slots] = out["argmax"]
        self.stable_steps[slots] = out["stable_steps"]
        packed = torch.cat([out["argmax"], out["converged"].unsqueeze(1).to(torch.int64)], dim=1).cpu()  # the one read
        rows = packed.tolist()
        return [CanvasResult(work=work, argmax_ids=row[:-1], converged=bool(row[-1]))
                for work, row in zip(works, rows, strict=True)]

    def committed_logprobs(self, slot: int, count: int, top: int) -> list[TokenLogprob]:
        """The first `count` positions' log-probabilities of the canvas `slot` denoised in the last step (with
        `top` alternatives each): a host read, made only when a canvas that asked for them commits."""
        selected = self.logprob_selected[slot, :count].tolist()
        top_ids = self.logprob_top_ids[slot, :count, :top].tolist()
        top_values = self.logprob_top[slot, :count, :top].tolist()
        ids = self.prev_argmax[slot, :count].tolist()  # the committed ids: this step's argmax
        return [TokenLogprob(token_id=token, logprob=value, top=tuple(zip(alt_ids, alt_values, strict=True)))
                for token, value, alt_ids, alt_values in zip(ids, selected, top_ids, top_values, strict=True)]
