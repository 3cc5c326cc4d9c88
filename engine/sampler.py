"""The entropy-bound uniform-state sampler, vectorised over every canvas in the batch.

# B canvases, C canvas length, V vocab, K = min(V, MAX_TOP_K) draw candidates, n logprob alternatives

One denoising step of canvas b at step k (1-based) of its N steps (docs: diffusiongemma.md section 5):
  z = logits / T,  T = tau * (t_min + (t_max - t_min) * (N - k + 1) / N)   (the reference counts steps N..1)
  s = a sample of softmax(z) (inverse CDF);  am = argmax(z);  H = entropy(softmax(z)) per position
  keep the lowest-entropy positions whose running entropy sum, excluding the current one, is <= bound
  next canvas = s where kept, else a fresh uniform id (re-noise over the whole vocabulary)
  converged = argmax unchanged for `stability_threshold` steps and mean(H) < confidence_threshold
Clamped (infill) positions always hold their fixed id, count as accepted with zero entropy and are left
out of the mean entropy. Every parameter is a per-canvas tensor: there is no Python loop over canvases.

Per-request knobs (SamplingParams): tau = `temperature` (default 1) multiplies the schedule. tau = 0 is greedy:
the draw is the argmax, and T stays the schedule's (tau = 1) for the entropy, the acceptance and the
self-conditioning, so a greedy canvas still denoises over several steps. `top_k` / `top_p` restrict only the
draw: among the K most likely ids, keep the first top_k, then the shortest prefix whose mass (renormalised
over those, or over the whole vocabulary without top_k) reaches top_p; draw from the kept ids by inverse CDF
with the same uniform. A nucleus wider than K = MAX_TOP_K ids is cut to those K (exact otherwise).

The vocabulary pass (no [B, C, V] temporary: the logits are never written, z is recomputed per chunk):
  read 1: max and argmax of the logits;  read 2: sum exp(z - max z) and its entropy term (plus, for a
  non-fp32 model, the self-conditioning normaliser over z rounded to the model dtype);  read 3: the
  inverse-CDF search;  read 4 (the model's `self_conditioning_from_logits`): the soft embedding.
  Only when a row of the batch uses them: one top-K of the logits (top_k/top_p), one top-n and one
  log-sum-exp pass (logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import rng
from engine.sampler_kernels import EAGER_KERNELS, ChunkKernels, CompiledWithFallback, shifted_z
from engine.types import MAX_TOP_K

__all__ = ["EAGER_KERNELS", "ChunkKernels", "CompiledWithFallback", "denoise_step", "initial_canvas",
           "scan_vocabulary", "temperature_at", "token_logprobs", "truncated_draw"]


def temperature_at(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Temperature of 1-based step `step` of `max_steps`: t_max at the first step, falling linearly."""
    steps_remaining = max_steps - step + 1
    return t_min + (t_max - t_min) * (steps_remaining / max_steps)


@dataclass(frozen=True)
class SamplerInputs:
    """Per-canvas parameters of this step; every field is a [B] tensor on the logits' device. The optional
    knobs are None when no canvas of the batch uses them (then their passes are skipped entirely)."""

    temperature: torch.Tensor  # float32: the schedule's temperature times the request's (1 for greedy rows)
    entropy_bound: torch.Tensor  # float32
    confidence_threshold: torch.Tensor  # float32
    stability_threshold: torch.Tensor  # int64
    may_stop_early: torch.Tensor  # bool: False for fixed_steps requests
    sample_keys: torch.Tensor  # int64, rng.stream_key(..., STREAM_SAMPLE)
    renoise_keys: torch.Tensor  # int64, rng.stream_key(..., STREAM_RENOISE)
    greedy: torch.Tensor | None = None  # bool: the draw is the argmax (temperature 0)
    top_k: torch.Tensor | None = None  # int64: 0 = off (given together with top_p)
    top_p: torch.Tensor | None = None  # float32: 1 = off


@dataclass(frozen=True)
class CanvasState:
    """What a canvas carries from one step to the next."""

    canvas_ids: torch.Tensor  # int64 [B, C]: the decoder input of this step
    prev_argmax: torch.Tensor  # int64 [B, C]: argmax of the previous step, -1 before the first
    stable_steps: torch.Tensor  # int64 [B]: consecutive previous steps with an identical argmax
    is_fixed: torch.Tensor  # bool [B, C]: clamped infill positions
    fixed_ids: torch.Tensor  # int64 [B, C]: their ids (ignored where not fixed)


@dataclass(frozen=True)
class TokenLogprobs:
    """log_softmax of the step's logits at temperature 1, for the canvas's argmax ids and the top n."""

    selected: torch.Tensor  # float32 [B, C]: of `SamplerOutput.argmax` (fixed ids where clamped)
    top_ids: torch.Tensor  # int64 [B, C, n], most likely first
    top_logprobs: torch.Tensor  # float32 [B, C, n]


@dataclass(frozen=True)
class SamplerOutput:
    next_canvas: torch.Tensor  # int64 [B, C]: decoder input of the next step
    argmax: torch.Tensor  # int64 [B, C]: the draft; committed when the canvas stops
    stable_steps: torch.Tensor  # int64 [B]
    converged: torch.Tensor  # bool [B]: stable and confident (never for fixed_steps canvases)
    entropy: torch.Tensor  # float32 [B, C]: per-position entropy of softmax(z)
    sc_log_norm: torch.Tensor  # float32 [B, C]: log sum exp of z rounded to the model dtype (self-conditioning)
    logprobs: TokenLogprobs | None = None  # when asked for


@dataclass(frozen=True)
class VocabularyScan:
    """What one scan of the logits yields, every field [B, C]."""

    sampled: torch.Tensor  # int64: the full-vocabulary draw
    argmax: torch.Tensor  # int64
    max_logit: torch.Tensor  # float32
    inv_temperature: torch.Tensor | None  # float32 [B, 1, 1]: 1 / T (None: T = 1)
    entropy: torch.Tensor  # float32, of softmax(z)
    exp_sum: torch.Tensor  # float32: sum exp(z - max_z)
    uniforms: torch.Tensor  # float32: the draw's uniform per position
    sc_log_norm: torch.Tensor  # float32: log sum exp(z rounded to `round_to`)


def scan_vocabulary(logits: torch.Tensor, sample_keys: torch.Tensor, vocab_chunk: int,
                    kernels: ChunkKernels = EAGER_KERNELS, temperature: torch.Tensor | None = None,
                    round_to: torch.dtype = torch.float32) -> VocabularyScan:
    """Categorical sample, argmax and entropy of softmax(z), z = logits [B, C, V] / temperature [B] (None:
    1), reading the logits in vocabulary chunks and never writing them.

    The first pass sums w = exp(z - max z) (and w (z - max z) for the entropy); the second draws by inverse
    CDF with one uniform u per position: the sample is the first id whose cumulative weight exceeds u * sum(w).
    Only ids with w > 0 can be drawn. The chunk width is fixed (not derived from B) so each canvas's
    floating-point sums do not depend on what it is batched with. `round_to` (the model dtype) adds the
    self-conditioning normaliser over z rounded to it to the first pass (free in fp32).
    """
    batch, length, vocab = logits.shape
    inv_t = None if temperature is None else (1.0 / temperature).view(batch, 1, 1)
    max_logit, argmax = logits.max(dim=-1)  # [B, C]; z's too, as T > 0
    max_z = max_logit if inv_t is None else max_logit * inv_t.view(batch, 1)
    exp_sum = torch.zeros(batch, length, dtype=torch.float32, device=logits.device)
    weighted_sum, rounded_sum = torch.zeros_like(exp_sum), torch.zeros_like(exp_sum)
    rounded_max = max_z.to(round_to).float()
    for start in range(0, vocab, vocab_chunk):
        chunk = logits[:, :, start:start + vocab_chunk]
        chunk_exp_sum, chunk_weighted_sum = kernels.statistics(chunk, max_logit, inv_t)
        exp_sum += chunk_exp_sum
        weighted_sum += chunk_weighted_sum
        if round_to != torch.float32:
            rounded = (chunk.float() if inv_t is None else chunk.float() * inv_t).to(round_to).float()
            rounded_sum += (rounded - rounded_max.unsqueeze(-1)).exp_().sum(-1)
    uniforms = rng.position_uniforms(sample_keys, torch.arange(length, device=logits.device, dtype=torch.int64))
    sampled = inverse_cdf_draw(logits, max_logit, inv_t, uniforms * exp_sum, vocab_chunk, kernels)
    # The two passes round their sums differently, so a target within rounding of the total can pass every
    # id: take the argmax then (always w = 1 > 0), a bias of the order of float32 rounding.
    sampled = torch.where(sampled < vocab, sampled, argmax)
    # H = -sum p log p with p = exp(z - m) / S  =>  H = log S - sum(exp(z - m) (z - m)) / S
    entropy = exp_sum.log() - weighted_sum / exp_sum
    sc_log_norm = max_z + exp_sum.log() if round_to == torch.float32 else rounded_max + rounded_sum.log()
    return VocabularyScan(sampled=sampled, argmax=argmax, max_logit=max_logit, inv_temperature=inv_t,
                          entropy=entropy, exp_sum=exp_sum, uniforms=uniforms, sc_log_norm=sc_log_norm)


def inverse_cdf_draw(logits: torch.Tensor, max_logit: torch.Tensor, inv_temperature: torch.Tensor | None,
                     target: torch.Tensor, vocab_chunk: int, kernels: ChunkKernels) -> torch.Tensor:
    """How many ids precede the first one whose cumulative exp(z - max z) exceeds `target` [B, C]: int64
    [B, C], equal to V when no id does (z = logits * inv_temperature [B, 1, 1]). Chunks after the one holding
    the answer add nothing (`searching`), so the ids counted are always a prefix of the vocabulary, with no
    host sync."""
    batch, length, vocab = logits.shape
    count = torch.zeros(batch, length, dtype=torch.int64, device=logits.device)
    searching = torch.ones(batch, length, dtype=torch.bool, device=logits.device)
    offset = torch.zeros(batch, length, dtype=torch.float32, device=logits.device)
    for start in range(0, vocab, vocab_chunk):
        chunk = logits[:, :, start:start + vocab_chunk]
        # clamped at 0: rounding of the running offset must never let a zero-weight first id be picked
        below, chunk_total = kernels.search(chunk, max_logit, inv_temperature, (target - offset).clamp_(min=0.0))
        count += torch.where(searching, below, 0)
        searching &= below == chunk.shape[-1]
        offset += chunk_total
    return count


def truncated_draw(logits: torch.Tensor, scan: VocabularyScan, top_k: torch.Tensor, top_p: torch.Tensor
                   ) -> torch.Tensor:
    """The draw under top_k [B] (0 = off) and top_p [B] (1 = off): int64 [B, C] (module docstring).

    Reads the logits once (top-K); the rest works on [B, C, K] candidates, sorted most likely first, so the
    kept ids are a prefix and the inverse-CDF search over their cumulative weight is exact."""
    batch = logits.shape[0]
    candidates = min(MAX_TOP_K, logits.shape[-1])
    values, ids = logits.topk(candidates, dim=-1)  # [B, C, K], the same order as z's
    weights = shifted_z(values, scan.max_logit, scan.inv_temperature).exp_()  # as the scan weighs them
    rank = torch.arange(candidates, device=logits.device)
    k = torch.where(top_k > 0, top_k, candidates).view(batch, 1, 1)
    weights = torch.where(rank < k, weights, 0.0)
    cumulative = weights.cumsum(dim=-1)
    # top_p is relative to what top_k kept, or to the whole vocabulary's mass without top_k
    mass = torch.where((top_k > 0).view(batch, 1), cumulative[..., -1], scan.exp_sum)
    in_nucleus = (cumulative - weights) < top_p.view(batch, 1, 1) * mass.unsqueeze(-1)  # the first always is
    kept = torch.where(in_nucleus, weights, 0.0).cumsum(dim=-1)
    target = (scan.uniforms * kept[..., -1]).unsqueeze(-1).contiguous()
    index = torch.searchsorted(kept, target, right=True).clamp_(max=candidates - 1)
    # past the kept prefix only through rounding: the last kept id is then the closest valid answer
    index = torch.minimum(index, in_nucleus.sum(dim=-1, keepdim=True) - 1)
    return ids.gather(-1, index).squeeze(-1)


def token_logprobs(logits: torch.Tensor, max_logit: torch.Tensor, ids: torch.Tensor, n: int, vocab_chunk: int
                   ) -> TokenLogprobs:
    """log_softmax(logits) at `ids` [B, C] and its top max(n, 1) entries: a log-sum-exp pass and a top-n read
    of the logits [B, C, V] (max_logit [B, C] is the scan's), no [B, C, V] temporary."""
    exp_sum = torch.zeros_like(max_logit)
    for start in range(0, logits.shape[-1], vocab_chunk):
        exp_sum += (logits[:, :, start:start + vocab_chunk] - max_logit.unsqueeze(-1)).exp().sum(dim=-1)
    log_norm = max_logit + exp_sum.log()
    top_values, top_ids = logits.topk(max(n, 1), dim=-1)
    selected = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - log_norm
    return TokenLogprobs(selected=selected, top_ids=top_ids, top_logprobs=top_values - log_norm.unsqueeze(-1))


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
                 kernels: ChunkKernels = EAGER_KERNELS, logprobs_top: int | None = None,
                 round_to: torch.dtype = torch.float32) -> SamplerOutput:
    """One sampler step for every canvas from the fp32 logits [B, C, V], which are only read (module
    docstring: the reads). `logprobs_top` (host int, None = skip) adds `TokenLogprobs` with that many
    alternatives; `round_to` is the model dtype (the self-conditioning normaliser's rounding)."""
    batch, length, vocab = logits.shape
    scan = scan_vocabulary(logits, inputs.sample_keys, vocab_chunk, kernels, inputs.temperature, round_to)
    sampled = scan.sampled
    if inputs.top_k is not None and inputs.top_p is not None:
        truncates = ((inputs.top_k > 0) | (inputs.top_p < 1.0)).view(batch, 1)
        sampled = torch.where(truncates, truncated_draw(logits, scan, inputs.top_k, inputs.top_p), sampled)
    if inputs.greedy is not None:
        sampled = torch.where(inputs.greedy.view(batch, 1), scan.argmax, sampled)
    argmax = torch.where(state.is_fixed, state.fixed_ids, scan.argmax)
    keep = entropy_bound_accept(scan.entropy, inputs.entropy_bound, state.is_fixed)
    positions = torch.arange(length, device=logits.device, dtype=torch.int64)
    renoise_ids = rng.uniform_token_ids(inputs.renoise_keys, positions, vocab)
    next_canvas = next_canvas_ids(keep, sampled, renoise_ids, state.is_fixed, state.fixed_ids)
    stable_steps, converged = stop_decision(argmax, state.prev_argmax, state.stable_steps, scan.entropy,
                                            state.is_fixed, inputs)
    logprobs = None
    if logprobs_top is not None:
        logprobs = token_logprobs(logits, scan.max_logit, argmax, logprobs_top, vocab_chunk)
    return SamplerOutput(next_canvas=next_canvas, argmax=argmax, stable_steps=stable_steps, converged=converged,
                         entropy=scan.entropy, sc_log_norm=scan.sc_log_norm, logprobs=logprobs)
