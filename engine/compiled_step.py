"""The decoder step as one region: the model's decoder forward, the LM head, the sampler and the next
self-conditioning embedding, run eagerly or as one `torch.compile(fullgraph=True)` graph per batch bucket.

# B canvases, Bb their bucket, C canvas length, D hidden, Nf / Ns block-table widths, bs block size

`decoder_step` is the whole step on a dict of tensors; the runner calls it through `StepRegion.run`. Eager
(`EngineConfig.compile_step` False), it runs on the batch as given. Compiled, the batch is copied into
persistent buffers preallocated per (batch bucket, full-table bucket) — batches padded up to a power of two
(1, 2, 4, ... up to max_canvases_in_flight), full block tables padded with the scratch block up to a power of
two of blocks, so the graph's shapes are static — and the graph reads the whole padded table (its context
bound is the table's width): every shape depends on the two buckets only, nothing reads a tensor on the host,
and a graph break fails compilation (`fullgraph=True`). Padding rows are whatever the buffers last held
(valid block ids and ids, so their reads are in bounds); their outputs are dropped. Padded table entries point
at the scratch block and masked keys contribute nothing.

On CUDA the same graphs are compiled with mode "reduce-overhead", i.e. captured as CUDA graphs by
torch.compile's cudagraph trees, and the persistent buffers and the KV pools are marked as static addresses
so a replay copies nothing. The same code runs on CPU (mode "default"), where the tests compile it.
Eager and compiled steps give the same tokens (tests/engine/test_compiled_step.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.config import FULL, SLIDING
from engine.kv_cache import BlockTables, PagedKVCache, blocks_for
from engine.model.transformer import DiffusionGemmaModel
from engine.sampler import CanvasState, ChunkKernels, SamplerInputs, denoise_step
from engine.sampler_kernels import EAGER_KERNELS

# Inputs of the step, every one with the batch as its first dimension. Optional knobs (greedy, top_k, top_p)
# are present only when a row of the batch uses them; each combination is its own graph.
STATE_INPUTS = ("canvas_ids", "positions", "context_lens", "full_table", "sliding_table", "sliding_first",
                "sc_embeds", "prev_argmax", "stable_steps", "is_fixed", "fixed_ids")
SAMPLER_INPUTS = ("temperature", "entropy_bound", "confidence_threshold", "stability_threshold",
                  "may_stop_early", "sample_keys", "renoise_keys")
OPTIONAL_INPUTS = ("greedy", "top_k", "top_p")
RECOMPILE_LIMIT = 64  # graphs per step function: buckets x table widths x knob combinations


def decoder_step(model: DiffusionGemmaModel, cache: PagedKVCache, inputs: dict[str, torch.Tensor],
                 context_bound: int, vocab_chunk: int, logprobs_top: int | None,
                 kernels: ChunkKernels = EAGER_KERNELS) -> dict[str, torch.Tensor]:
    """One decoder step of every canvas in `inputs` (names above) -> next_canvas, argmax [B, C], stable_steps,
    converged [B], sc_embeds [B, C, D] (the next step's self-conditioning input) and, with `logprobs_top`,
    logprob_selected [B, C], logprob_top_ids, logprob_top [B, C, n]. Reads the KV cache, writes nothing."""
    tables = BlockTables(full=inputs["full_table"], sliding=inputs["sliding_table"],
                         sliding_first=inputs["sliding_first"])
    logits = model.denoise(inputs["canvas_ids"], inputs["positions"], cache, tables, inputs["context_lens"],
                           inputs["sc_embeds"], context_bound=context_bound)  # fp32 [B, C, V]
    state = CanvasState(canvas_ids=inputs["canvas_ids"], prev_argmax=inputs["prev_argmax"],
                        stable_steps=inputs["stable_steps"], is_fixed=inputs["is_fixed"],
                        fixed_ids=inputs["fixed_ids"])
    optional: dict[str, Any] = {name: inputs.get(name) for name in OPTIONAL_INPUTS}
    sampler_inputs = SamplerInputs(**{name: inputs[name] for name in SAMPLER_INPUTS}, **optional)
    out = denoise_step(logits, state, sampler_inputs, vocab_chunk, kernels, logprobs_top=logprobs_top,
                       round_to=model.embed_tokens.weight.dtype)
    result = {"next_canvas": out.next_canvas, "argmax": out.argmax, "stable_steps": out.stable_steps,
              "converged": out.converged,
              "sc_embeds": model.self_conditioning_from_logits(logits, sampler_inputs.temperature,
                                                                out.sc_log_norm, vocab_chunk)}
    if out.logprobs is not None:
        result.update(logprob_selected=out.logprobs.selected, logprob_top_ids=out.logprobs.top_ids,
                      logprob_top=out.logprobs.top_logprobs)
    return result


def bucket(count: int) -> int:
    """The power of two >= count (count >= 1)."""
    return 1 << max(count - 1, 0).bit_length()


class StepRegion:
    """Runs `decoder_step` eagerly or compiled (module docstring). One per runner."""

    def __init__(self, model: DiffusionGemmaModel, cache: PagedKVCache, compiled: bool, vocab_chunk: int,
                 kernels: ChunkKernels = EAGER_KERNELS, backend: str = "inductor") -> None:
        self.model, self.cache, self.compiled = model, cache, compiled
        self.vocab_chunk, self.kernels = vocab_chunk, kernels
        self.device = model.embed_tokens.weight.device
        self.mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self._buffers: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
        self._compiled_step: Callable[..., dict[str, torch.Tensor]] | None = None
        if compiled:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            for pool in (*cache.keys, *cache.values):  # replays read the pools in place (CUDA graphs)
                torch._dynamo.mark_static_address(pool)
            # `backend` other than inductor: tests (the same trace and graph-break checks, no code generation)
            self._compiled_step = torch.compile(self._graph, fullgraph=True, dynamic=False, backend=backend,
                                                mode=self.mode if backend == "inductor" else None)

    def _graph(self, inputs: dict[str, torch.Tensor], context_bound: int, logprobs_top: int | None
               ) -> dict[str, torch.Tensor]:
        return decoder_step(self.model, self.cache, inputs, context_bound, self.vocab_chunk, logprobs_top)

    def run(self, inputs: dict[str, torch.Tensor], context_bound: int, logprobs_top: int | None
            ) -> dict[str, torch.Tensor]:
        """The step's outputs for the B rows of `inputs` (eager: `context_bound` as given; compiled: the
        padded full table's whole width)."""
        if self._compiled_step is None:
            return decoder_step(self.model, self.cache, inputs, context_bound, self.vocab_chunk, logprobs_top,
                                self.kernels)
        rows = inputs["canvas_ids"].shape[0]
        buffers = self._padded(inputs)
        bound = min(buffers["full_table"].shape[1] * self.cache.block_size, self.cache.max_context)
        out = self._compiled_step(buffers, bound, logprobs_top)
        return {name: value[:rows] for name, value in out.items()}

    def _padded(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy the batch into its bucket's persistent buffers (allocated on first use)."""
        rows, width = inputs["canvas_ids"].shape[0], inputs["full_table"].shape[1]
        widest = blocks_for(self.cache.max_context, self.cache.block_size)
        key = (bucket(rows), max(width, min(bucket(width), widest)), inputs["sliding_table"].shape[1],
               tuple(sorted(inputs)))
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = self._allocate(inputs, key[0], key[1])
        for name, value in inputs.items():
            target = buffers[name]
            if name == "full_table":  # columns past this batch's width: the scratch block, masked out
                target[:rows, width:] = self.cache.scratch[FULL]
                target[:rows, :width].copy_(value)
            else:
                target[:rows].copy_(value)
        return buffers

    def _allocate(self, inputs: dict[str, torch.Tensor], rows: int, width: int) -> dict[str, torch.Tensor]:
        buffers = {}
        for name, value in inputs.items():
            shape = (rows, width) if name == "full_table" else (rows, *value.shape[1:])
            buffers[name] = torch.zeros(shape, dtype=value.dtype, device=value.device)
            torch._dynamo.mark_static_address(buffers[name])
        buffers["full_table"].fill_(self.cache.scratch[FULL])
        buffers["sliding_table"].fill_(self.cache.scratch[SLIDING])
        return buffers
