"""The entropy-bound uniform-state sampler, vectorised over every canvas in the batch.

# B canvases, C canvas length, V vocab

One denoising step of canvas b at step k (1-based) of its N steps (docs: diffusiongemma.md section 5):
  z = logits / T,  T = t_min + (t_max - t_min) * (N - k + 1) / N   (the reference counts steps down N..1)
  s = a sample of softmax(z) (inverse CDF);  am = argmax(z);  H = entropy(softmax(z)) per position
  keep the lowest-entropy positions whose running entropy sum, excluding the current one, is <= bound
  next canvas = s where kept, else a fresh uniform id (re-noise over the whole vocabulary)
  converged = argmax unchanged for `stability_threshold` steps and mean(H) < confidence_threshold
Clamped (infill) positions always hold their fixed id, count as accepted with zero entropy and are left
out of the mean entropy. Every parameter is a per-canvas tensor: there is no Python loop over canvases.
The [B, C, V] logits are scaled in place and then only read in vocabulary chunks, so no second
[B, C, V] tensor is ever materialised.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import rng


def temperature_at(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Temperature of 1-based step `step` of `max_steps`: t_max at the first step, falling linearly."""
    steps_remaining = max_steps - step + 1
    return t_min + (t_max - t_min) * (steps_remaining / max_steps)


@dataclass(frozen=True)
class SamplerInputs:
    """Per-canvas parameters of this step; every field is a [B] tensor on the logits' device."""

    temperature: torch.Tensor  # float32
    entropy_bound: torch.Tensor  # float32
    confidence_threshold: torch.Tensor  # float32
    stability_threshold: torch.Tensor  # int64
    may_stop_early: torch.Tensor  # bool: False for fixed_steps requests
    sample_keys: torch.Tensor  # int64, rng.stream_key(..., STREAM_SAMPLE)
    renoise_keys: torch.Tensor  # int64, rng.stream_key(..., STREAM_RENOISE)


@dataclass(frozen=True)
class CanvasState:
    """What a canvas carries from one step to the next."""

    canvas_ids: torch.Tensor  # int64 [B, C]: the decoder input of this step
    prev_argmax: torch.Tensor  # int64 [B, C]: argmax of the previous step, -1 before the first
    stable_steps: torch.Tensor  # int64 [B]: consecutive previous steps with an identical argmax
    is_fixed: torch.Tensor  # bool [B, C]: clamped infill positions
    fixed_ids: torch.Tensor  # int64 [B, C]: their ids (ignored where not fixed)


@dataclass(frozen=True)
class SamplerOutput:
    next_canvas: torch.Tensor  # int64 [B, C]: decoder input of the next step
    argmax: torch.Tensor  # int64 [B, C]: the draft; committed when the canvas stops
    stable_steps: torch.Tensor  # int64 [B]
    converged: torch.Tensor  # bool [B]: stable and confident (never for fixed_steps canvases)
    entropy: torch.Tensor  # float32 [B, C]: per-position entropy of softmax(z)


def chunk_statistics(chunk: torch.Tensor, max_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One vocabulary chunk z[:, :, ids] [B, C, v] -> (sum exp(z - m), sum exp(z - m) (z - m)), each [B, C].
    Pure: reads its inputs, writes only temporaries."""
    shifted = chunk.float() - max_z.unsqueeze(-1)
    weights = shifted.exp()
    return weights.sum(dim=-1), (weights * shifted).sum(dim=-1)


def chunk_search(chunk: torch.Tensor, max_z: torch.Tensor, threshold: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF search inside one chunk [B, C, v]: (how many ids have a chunk-local cumulative weight
    sum exp(z - m) <= threshold, the chunk's total weight), each [B, C]. Pure, like `chunk_statistics`.

    The local cumulative sum is non-decreasing, so the ids counted are a prefix of the chunk and the first
    id not counted has a positive weight whenever threshold >= 0."""
    cumulative = (chunk.float() - max_z.unsqueeze(-1)).exp().cumsum(dim=-1)
    below = torch.searchsorted(cumulative, threshold.unsqueeze(-1).contiguous(), right=True)
    return below.squeeze(-1), cumulative[..., -1]


class ChunkKernels:
    """The two per-chunk passes of the vocabulary scan, eager. Subclasses may compile them."""

    def statistics(self, chunk: torch.Tensor, max_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunk_statistics(chunk, max_z)

    def search(self, chunk: torch.Tensor, max_z: torch.Tensor, threshold: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return chunk_search(chunk, max_z, threshold)


EAGER_KERNELS = ChunkKernels()


@functools.cache
def compiled_kernel(function: Callable[..., tuple[torch.Tensor, torch.Tensor]], backend: str = "inductor"
                    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`function` through torch.compile (on CUDA a fused kernel per chunk instead of several passes)."""
    return torch.compile(function, dynamic=True, backend=backend)


class CompiledWithFallback(ChunkKernels):
    """The compiled chunk passes, falling back to eager for good if compiling or running them fails
    (a missing compiler toolchain must cost speed, never requests). Safe to retry: the passes are pure."""

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.failed_with: Exception | None = None

    def _run(self, function: Callable[..., tuple[torch.Tensor, torch.Tensor]], *args: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed_with is None:
            try:
                return compiled_kernel(function, self.backend)(*args)
            except Exception as err:  # torch.compile raises backend-specific error types
                self.failed_with = err
        return function(*args)

    def statistics(self, chunk: torch.Tensor, max_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(chunk_statistics, chunk, max_z)

    def search(self, chunk: torch.Tensor, max_z: torch.Tensor, threshold: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(chunk_search, chunk, max_z, threshold)


def scan_vocabulary(z: torch.Tensor, sample_keys: torch.Tensor, vocab_chunk: int,
                    kernels: ChunkKernels = EAGER_KERNELS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Categorical sample, argmax and entropy of softmax(z), reading z [B, C, V] in vocabulary chunks.

    Returns (sampled int64 [B, C], argmax int64 [B, C], entropy float32 [B, C]). The first pass sums
    w = exp(z - max z) (and w (z - max z) for the entropy); the second draws by inverse CDF with one uniform
    u per position: the sample is the first id whose cumulative weight exceeds u * sum(w). Only ids with
    w > 0 can be drawn. The chunk width is fixed (not derived from B) so each canvas's floating-point sums
    do not depend on what it is batched with.
    """
    batch, length, vocab = z.shape
    max_z, argmax = z.max(dim=-1)  # [B, C]
    exp_sum = torch.zeros(batch, length, dtype=torch.float32, device=z.device)
    weighted_sum = torch.zeros_like(exp_sum)
    for start in range(0, vocab, vocab_chunk):
        chunk_exp_sum, chunk_weighted_sum = kernels.statistics(z[:, :, start:start + vocab_chunk], max_z)
        exp_sum += chunk_exp_sum
        weighted_sum += chunk_weighted_sum
    positions = torch.arange(length, device=z.device, dtype=torch.int64)
    sampled = inverse_cdf_draw(z, max_z, rng.position_uniforms(sample_keys, positions) * exp_sum,
                               vocab_chunk, kernels)
    # The two passes round their sums differently, so a target within rounding of the total can pass every
    # id: take the argmax then (always w = 1 > 0), a bias of the order of float32 rounding.
    sampled = torch.where(sampled < vocab, sampled, argmax)
    # H = -sum p log p with p = exp(z - m) / S  =>  H = log S - sum(exp(z - m) (z - m)) / S
    entropy = exp_sum.log() - weighted_sum / exp_sum
    return sampled, argmax, entropy


def inverse_cdf_draw(z: torch.Tensor, max_z: torch.Tensor, target: torch.Tensor, vocab_chunk: int,
                     kernels: ChunkKernels) -> torch.Tensor:
    """How many ids precede the first one whose cumulative exp(z - max z) exceeds `target` [B, C]: int64
    [B, C], equal to V when no id does. Chunks after the one holding the answer add nothing (`searching`),
    so the ids counted are always a prefix of the vocabulary, with no host sync."""
    batch, length, vocab = z.shape
    count = torch.zeros(batch, length, dtype=torch.int64, device=z.device)
    searching = torch.ones(batch, length, dtype=torch.bool, device=z.device)
    offset = torch.zeros(batch, length, dtype=torch.float32, device=z.device)
    for start in range(0, vocab, vocab_chunk):
        chunk = z[:, :, start:start + vocab_chunk]
        # clamped at 0: rounding of the running offset must never let a zero-weight first id be picked
        below, chunk_total = kernels.search(chunk, max_z, (target - offset).clamp_(min=0.0))
        count += torch.where(searching, below, 0)
        searching &= below == chunk.shape[-1]
        offset += chunk_total
    return count


def entropy_bound_accept(entropy: torch.Tensor, entropy_bound: torch.Tensor, is_fixed: torch.Tensor
                         ) -> torch.Tensor:
    """Positions to accept: bool [B, C].

    Sort positions by entropy (fixed ones count as zero, so they always come first and cost nothing) and keep
    the prefix whose cumulative entropy minus the current entropy stays <= the canvas's bound. The first
    position always passes (0 <= bound), so at least one position is accepted.
    """
    effective = torch.where(is_fixed, torch.zeros_like(entropy), entropy)
    sorted_entropy, order = torch.sort(effective, dim=-1)
    keep_sorted = (sorted_entropy.cumsum(dim=-1) - sorted_entropy) <= entropy_bound.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def next_canvas_ids(keep: torch.Tensor, sampled: torch.Tensor, renoise_ids: torch.Tensor,
                    is_fixed: torch.Tensor, fixed_ids: torch.Tensor) -> torch.Tensor:
    """Accepted positions take the sample, the others a fresh uniform id; fixed positions their id."""
    return torch.where(is_fixed, fixed_ids, torch.where(keep, sampled, renoise_ids))


def stop_decision(argmax: torch.Tensor, prev_argmax: torch.Tensor, stable_steps: torch.Tensor,
                  entropy: torch.Tensor, is_fixed: torch.Tensor, inputs: SamplerInputs
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable-and-confident stopping. Returns (stable_steps [B], converged [B]).

    The argmax must equal the argmaxes of the previous `stability_threshold` steps (a run counter replaces the
    reference's history buffer: equal by induction), and the mean entropy over free positions must be below
    the confidence threshold.
    """
    unchanged = (argmax == prev_argmax).all(dim=-1)
    stable_steps = torch.where(unchanged, stable_steps + 1, torch.zeros_like(stable_steps))
    stable = stable_steps >= inputs.stability_threshold
    free = (~is_fixed).to(entropy.dtype)
    mean_entropy = (entropy * free).sum(dim=-1) / free.sum(dim=-1).clamp(min=1.0)
    confident = mean_entropy < inputs.confidence_threshold
    return stable_steps, stable & confident & inputs.may_stop_early


def initial_canvas(keys: torch.Tensor, canvas_length: int, vocab_size: int, is_fixed: torch.Tensor,
                   fixed_ids: torch.Tensor) -> torch.Tensor:
    """The canvas before the first step: uniform ids over the vocabulary, fixed positions clamped. [B, C]"""
    positions = torch.arange(canvas_length, device=keys.device, dtype=torch.int64)
    noise = rng.uniform_token_ids(keys, positions, vocab_size)
    return torch.where(is_fixed, fixed_ids, noise)


def denoise_step(logits: torch.Tensor, state: CanvasState, inputs: SamplerInputs, vocab_chunk: int,
                 kernels: ChunkKernels = EAGER_KERNELS) -> SamplerOutput:
    """One sampler step for every canvas. `logits` (fp32 [B, C, V]) is divided by the temperature IN PLACE:
    afterwards it holds z, the self-conditioning input of the next step."""
    batch, length, vocab = logits.shape
    logits.div_(inputs.temperature.view(batch, 1, 1))
    sampled, argmax, entropy = scan_vocabulary(logits, inputs.sample_keys, vocab_chunk, kernels)
    argmax = torch.where(state.is_fixed, state.fixed_ids, argmax)
    keep = entropy_bound_accept(entropy, inputs.entropy_bound, state.is_fixed)
    positions = torch.arange(length, device=logits.device, dtype=torch.int64)
    renoise_ids = rng.uniform_token_ids(inputs.renoise_keys, positions, vocab)
    next_canvas = next_canvas_ids(keep, sampled, renoise_ids, state.is_fixed, state.fixed_ids)
    stable_steps, converged = stop_decision(argmax, state.prev_argmax, state.stable_steps, entropy,
                                            state.is_fixed, inputs)
    return SamplerOutput(next_canvas=next_canvas, argmax=argmax, stable_steps=stable_steps,
                         converged=converged, entropy=entropy)
