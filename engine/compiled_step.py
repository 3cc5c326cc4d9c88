"""The decoder step and the encoder passes as regions run eagerly or as one `torch.compile(fullgraph=True)`
graph per bucket: the step is the model's decoder forward, the LM head, the sampler and the next
self-conditioning embedding; an encoder pass is a prefill chunk, a commit or infill text, writing the KV cache.

# B canvases, Bb their bucket, C canvas length, D hidden, Nf / Ns block-table widths, bs block size

`decoder_step` is the whole step on a dict of tensors; the runner calls it through `StepRegion.run`. Eager
(`EngineConfig.compile_step` False), it runs on the batch as given. Compiled, the batch is copied into
persistent buffers preallocated per (batch bucket, full-table bucket) — batches padded up to a power of two
(1, 2, 4, ... up to max_canvases_in_flight), full block tables padded with the scratch block up to a power of
two of blocks, so the graph's shapes are static — and the graph reads the whole padded table (its context
bound is the table's width): every shape depends on the two buckets only, nothing reads a tensor on the host,
and a graph break fails compilation (`fullgraph=True`). Padding rows repeat the last real row (`copy_padded`:
valid knobs, reads in bounds); their outputs are dropped. Padded table entries point at the scratch block and
masked keys contribute nothing. `EncodeRegion` does the same for `encoder_pass`, bucketed by rows and tokens
(`EngineConfig.compile_encoder`, None = as compile_step); its padding tokens and rows write only the scratch block.

Each transformer layer is a nested compile region (engine/model/layer.py): one compiled body per attention
kind, reused by every layer of that kind. On CUDA the graphs are captured as CUDA graphs by torch.compile's
cudagraph trees (option `triton.cudagraphs`, what mode "reduce-overhead" sets), and the persistent buffers and
the KV pools are marked as static addresses so a replay copies nothing. On CPU inductor emits vectorised C++
(`compile_options`). Tests compile both regions on CPU (aot_eager, fullgraph) and compare with eager, and the
encoder pass and the RNG kernels with inductor (tests/engine/test_compiled_step.py, test_rng_inductor.py);
docs/benchmarks.md has the compile times and speed on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.config import FULL, SLIDING
from engine.kv_cache import BlockTables, PagedKVCache, blocks_for
from engine.model.moe import probe_expert_kernels
from engine.model.transformer import DiffusionGemmaModel, RowGroups
from engine.sampler import CanvasState, ChunkKernels, SamplerInputs, denoise_step
from engine.sampler_kernels import EAGER_KERNELS

# Inputs of the step, every one with the batch as its first dimension. Optional knobs (greedy, top_k, top_p)
# are present only when a row of the batch uses them; each combination is its own graph.
STATE_INPUTS = ("canvas_ids", "positions", "context_lens", "full_table", "sliding_table", "sliding_first",
                "sc_embeds", "prev_argmax", "stable_steps", "is_fixed", "fixed_ids")
SAMPLER_INPUTS = ("temperature", "entropy_bound", "confidence_threshold", "stability_threshold",
                  "may_stop_early", "sample_keys", "renoise_keys")
OPTIONAL_INPUTS = ("greedy", "top_k", "top_p")
RECOMPILE_LIMIT = 64  # graphs per region: buckets x table widths x knob combinations (or token buckets)


def decoder_step(model: DiffusionGemmaModel, cache: PagedKVCache, inputs: dict[str, torch.Tensor],
                 context_bound: int, vocab_chunk: int, logprobs_top: int | None,
                 kernels: ChunkKernels = EAGER_KERNELS, row_groups: RowGroups | None = None
                 ) -> dict[str, torch.Tensor]:
    """One decoder step of every canvas in `inputs` (names above) -> next_canvas, argmax [B, C], stable_steps,
    converged [B], sc_embeds [B, C, D] (the next step's self-conditioning input) and, with `logprobs_top`,
    logprob_selected [B, C], logprob_top_ids, logprob_top [B, C, n]. Reads the KV cache, writes nothing.
    `row_groups`: as `DiffusionGemmaModel.denoise` takes them (eager only)."""
    tables = BlockTables(full=inputs["full_table"], sliding=inputs["sliding_table"],
                         sliding_first=inputs["sliding_first"])
    logits = model.denoise(inputs["canvas_ids"], inputs["positions"], cache, tables, inputs["context_lens"],
                           inputs["sc_embeds"], context_bound=context_bound, row_groups=row_groups)  # fp32 [B, C, V]
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


def compile_options(device: torch.device, backend: str) -> dict[str, Any]:
    """torch.compile's keyword arguments for a step region (inductor only; other backends: none).

    CUDA: CUDA graphs (`triton.cudagraphs`, what mode "reduce-overhead" sets; mode and options cannot both be
    given). CPU: inductor's explicitly vectorised C++ kernels (they crashed on the counter-based RNG until
    engine/rng.py kept its 64-bit counter multiply out of inductor's index arithmetic: `rng._opaque_counters`).
    Both: no size/stride/alignment asserts in the generated wrapper (hundreds per step: our inputs are the
    persistent buffers allocated here, the weights fixed at load), and no tensor guards on the model's
    parameters (`skip_parameter_guards`; docs/benchmarks.md, issue 14: both a measured share of a batch-1 step)."""
    if backend != "inductor":
        return {}
    options: dict[str, Any] = {"size_asserts": False, "alignment_asserts": False,
                               "guard_filter_fn": skip_parameter_guards}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    return {"options": options}


def skip_parameter_guards(guard_entries: list[Any]) -> list[bool]:
    """Keep every dynamo guard but the tensor checks of the model's parameters and buffers (one per tensor on
    every call; they are fixed after loading). The guards on the modules themselves and their other attributes
    stay, so another model, or a changed attribute, still recompiles instead of reusing a graph."""
    return [not (entry.guard_type == "TENSOR_MATCH" and entry.orig_guard.source.is_unspecialized_nn_module())
            for entry in guard_entries]


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
        self._buffers: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
        self._compiled_step: Callable[..., dict[str, torch.Tensor]] | None = None
        if compiled:
            prepare_compile(model, cache)
            # `backend` other than inductor: tests (the same trace and graph-break checks, no code generation)
            self._compiled_step = torch.compile(self._graph, fullgraph=True, dynamic=False, backend=backend,
                                                **compile_options(self.device, backend))

    def _graph(self, inputs: dict[str, torch.Tensor], context_bound: int, logprobs_top: int | None
               ) -> dict[str, torch.Tensor]:
        return decoder_step(self.model, self.cache, inputs, context_bound, self.vocab_chunk, logprobs_top)

    def run(self, inputs: dict[str, torch.Tensor], context_bound: int, logprobs_top: int | None,
            row_groups: RowGroups | None = None) -> dict[str, torch.Tensor]:
        """The step's outputs for the B rows of `inputs` (eager: `context_bound` and `row_groups` as given;
        compiled: the padded full table's whole width, one group: a graph's shapes cannot follow the
        groups, and on a GPU a paged-attention kernel that skips blocks past each row's context is the way
        to the same saving, docs/architecture.md)."""
        if self._compiled_step is None:
            return decoder_step(self.model, self.cache, inputs, context_bound, self.vocab_chunk, logprobs_top,
                                self.kernels, row_groups)
        rows = inputs["canvas_ids"].shape[0]
        buffers = self._padded(inputs)
        bound = min(buffers["full_table"].shape[1] * self.cache.block_size, self.cache.max_context)
        out = self._compiled_step(buffers, bound, logprobs_top)
        return {name: value[:rows] for name, value in out.items()}

    def _padded(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy the batch into its bucket's persistent buffers (allocated on first use)."""
        rows, width = inputs["canvas_ids"].shape[0], inputs["full_table"].shape[1]
        key = (bucket(rows), table_bucket(width, self.cache), inputs["sliding_table"].shape[1],
               tuple(sorted(inputs)))
        buffers = self._buffers.get(key)
        if buffers is None:
            shapes = {name: (key[0], key[1]) if name == "full_table" else (key[0], *value.shape[1:])
                      for name, value in inputs.items()}
            buffers = self._buffers[key] = allocate(inputs, shapes)
        for name, value in inputs.items():
            # full table columns past this batch's width: the scratch block, masked out
            copy_padded(buffers[name], value, self.cache.scratch[FULL] if name == "full_table" else None)
        return buffers


def table_bucket(width: int, cache: PagedKVCache) -> int:
    """A block table's padded width: the power of two >= width, capped at the widest table (max_context)."""
    return max(width, min(bucket(width), blocks_for(cache.max_context, cache.block_size)))


def allocate(inputs: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Zeroed persistent buffers of `shapes`, dtypes and device as `inputs`, marked static for CUDA graphs."""
    buffers = {}
    for name, value in inputs.items():
        buffers[name] = torch.zeros(shapes[name], dtype=value.dtype, device=value.device)
        torch._dynamo.mark_static_address(buffers[name])
    return buffers


def copy_padded(target: torch.Tensor, value: torch.Tensor, fill: float | bool | torch.Tensor | None = None) -> None:
    """value [b, w, ...] into the corner of target [Bb, Wb, ...]: columns w.. of the real rows get `fill` (when
    target is wider), and padding rows b.. repeat the last real row, so every knob of a padding row is valid
    (a zeroed row had temperature 0 and top_k 0, whose nucleus draw indexed -1) and its reads are in bounds;
    their outputs are dropped."""
    rows = value.shape[0]
    if value.dim() >= 2 and target.shape[1] > value.shape[1]:
        if fill is None:
            raise ValueError(f"a buffer wider than its input ({target.shape[1]} > {value.shape[1]}) needs a fill")
        target[:rows, value.shape[1]:] = fill
        target[:rows, :value.shape[1]].copy_(value)
    else:
        target[:rows].copy_(value)
    target[rows:] = target[rows - 1]


# Inputs of an encoder pass: R rows of T tokens each, right-padded (`token_valid`), and their block tables.
ENCODE_INPUTS = ("token_ids", "positions", "token_valid", "full_table", "sliding_table", "sliding_first")


def encoder_pass(model: DiffusionGemmaModel, cache: PagedKVCache, inputs: dict[str, torch.Tensor],
                 context_bound: int) -> None:
    """One encoder forward over `inputs` (ENCODE_INPUTS): writes the valid tokens' K/V into the cache."""
    tables = BlockTables(full=inputs["full_table"], sliding=inputs["sliding_table"],
                         sliding_first=inputs["sliding_first"])
    model.encode(inputs["token_ids"], inputs["positions"], inputs["token_valid"], cache, tables,
                 context_bound=context_bound)


class EncodeRegion:
    """Runs `encoder_pass` (prefill chunks, commits, infill text) eagerly or compiled, one fullgraph graph per
    (row bucket, token bucket, full-table bucket, sliding-table bucket). Padding tokens are invalid (their K/V go
    to the scratch block, their outputs are dropped), at positions continuing their row's; padding rows repeat
    the last real row with every token invalid, so they write nothing visible."""

    def __init__(self, model: DiffusionGemmaModel, cache: PagedKVCache, compiled: bool,
                 backend: str = "inductor") -> None:
        self.model, self.cache, self.compiled = model, cache, compiled
        self.pad_id = model.config.pad_token_id
        self._buffers: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        self._compiled_pass: Callable[..., None] | None = None
        if compiled:
            prepare_compile(model, cache)
            self._compiled_pass = torch.compile(self._graph, fullgraph=True, dynamic=False, backend=backend,
                                                **compile_options(model.embed_tokens.weight.device, backend))

    def _graph(self, inputs: dict[str, torch.Tensor], context_bound: int) -> None:
        encoder_pass(self.model, self.cache, inputs, context_bound)

    def run(self, inputs: dict[str, torch.Tensor], context_bound: int) -> None:
        """Write the K/V of `inputs` (eager: reading `context_bound` past positions; compiled: the padded full
        table's whole width, the extra keys masked)."""
        if self._compiled_pass is None:
            encoder_pass(self.model, self.cache, inputs, context_bound)
            return
        buffers = self._padded(inputs)
        self._compiled_pass(buffers, min(buffers["full_table"].shape[1] * self.cache.block_size,
                                         self.cache.max_context))

    def _padded(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        (rows, tokens), full, sliding = inputs["token_ids"].shape, inputs["full_table"], inputs["sliding_table"]
        key = (bucket(rows), bucket(tokens), table_bucket(full.shape[1], self.cache), bucket(sliding.shape[1]))
        buffers = self._buffers.get(key)
        if buffers is None:
            per_token = (key[0], key[1])
            buffers = self._buffers[key] = allocate(inputs, {
                "token_ids": per_token, "positions": per_token, "token_valid": per_token,
                "full_table": (key[0], key[2]), "sliding_table": (key[0], key[3]), "sliding_first": (key[0],)})
        steps = torch.arange(1, key[1] - tokens + 1, device=full.device)
        scratch = self.cache.scratch
        fills: dict[str, Any] = {"token_ids": self.pad_id, "token_valid": False, "full_table": scratch[FULL],
                                 "sliding_table": scratch[SLIDING], "sliding_first": None,
                                 "positions": inputs["positions"][:, -1:] + steps}
        for name, value in inputs.items():
            copy_padded(buffers[name], value, fills[name])
        buffers["token_valid"][rows:] = False
        return buffers


def prepare_compile(model: DiffusionGemmaModel, cache: PagedKVCache) -> None:
    """Once per region: the expert-kernel probes run eagerly (a compiled graph only reads their results), room
    for every bucket's graph, and the KV pools marked static (CUDA graphs read and write them in place)."""
    weight = model.embed_tokens.weight
    probe_expert_kernels(weight.device, weight.dtype)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for pool in (*cache.keys, *cache.values):
        torch._dynamo.mark_static_address(pool)
