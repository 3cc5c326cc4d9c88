"""The training objective of the released model (docs/training.md) on the engine's own model.

One step: encoder-mode pass over prompt + clean canvas into a fresh KV cache (next-token loss), then
the denoiser twice over the corrupted canvas: pass 1 without self-conditioning and without gradients,
pass 2 fed pass 1's logits as self-conditioning for a random half of the rows (zeros for the rest).
Loss = canvas cross-entropy (clean targets at every position) + the encoder's next-token loss.

The single encoder pass caches the clean canvas too; the denoiser only reads positions below each
row's prompt length, and the sliding window must hold prompt + canvas (checked) so no prompt entry is
overwritten in the ring.

Shape legend: B rows, L = prompt + canvas tokens, C canvas length, V vocab, D hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model.transformer import DiffusionGemmaModel

from .data import Batch

IGNORE = -100


def check_trainable_layout(config: ModelConfig, max_prompt_tokens: int) -> None:
    if max_prompt_tokens + config.canvas_length > config.sliding_window:
        raise ValueError(f"max_prompt_tokens + canvas_length ({max_prompt_tokens} + {config.canvas_length}) must "
                         f"fit the sliding window ({config.sliding_window}) for the one-pass training cache")


@dataclass(frozen=True)
class StepLosses:
    total: torch.Tensor
    canvas_ce: float
    encoder_ce: float
    canvas_accuracy: float  # argmax == clean target over corrupted canvas positions


# Rows of vocabulary-sized training tensors per piece of the encoder loss: 1024 x 4096 fp32 is 16 MiB,
# below glibc's largest mmap threshold (32 MiB), so the allocator reuses freed heap pages instead of
# mapping and zero-faulting fresh ones on every step (measured: up to 15 % of a one-thread CPU step).
ENCODER_LOSS_ROWS = 1024


def _encode_context(model: DiffusionGemmaModel, batch: Batch) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Encoder pass into a fresh cache -> (cache, slots, next-token CE over the positions with a target).

    The LM head runs only on those positions (not on padding), in pieces of ENCODER_LOSS_ROWS rows."""
    rows, width = batch.input_ids.shape
    weight = model.embed_tokens.weight
    cache = KVCache(model.config, num_slots=rows, max_context=width, device=weight.device, dtype=weight.dtype)
    slots = torch.arange(rows, device=weight.device)
    hidden = model.encode(batch.input_ids, batch.positions, batch.token_valid, cache, slots, context_bound=0)
    scored = batch.lm_targets != IGNORE
    hidden, targets = hidden[scored], batch.lm_targets[scored]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], ENCODER_LOSS_ROWS):
        piece = slice(start, start + ENCODER_LOSS_ROWS)
        total = total + F.cross_entropy(model.logits(hidden[piece]), targets[piece], reduction="sum")
    return cache, slots, total / max(targets.shape[0], 1)


def diffusion_losses(model: DiffusionGemmaModel, batch: Batch, generator: torch.Generator,
                     encoder_weight: float = 1.0) -> StepLosses:
    """Losses of one batch (gradients flow through pass 2 and the encoder pass only)."""
    cache, slots, encoder_ce = _encode_context(model, batch)
    bound = int(batch.prompt_lens.max())
    with torch.no_grad():
        first = model.denoise(batch.canvas_noisy, batch.canvas_positions, cache, slots, batch.prompt_lens,
                              sc_embeds=None, context_bound=bound)
    use_sc = torch.rand(first.shape[0], generator=generator) < 0.5
    sc_embeds = model.self_conditioning_embeds(first) * use_sc[:, None, None].to(first.dtype)
    logits = model.denoise(batch.canvas_noisy, batch.canvas_positions, cache, slots, batch.prompt_lens,
                           sc_embeds=sc_embeds, context_bound=bound)
    canvas_ce = F.cross_entropy(logits.flatten(0, 1), batch.canvas_clean.flatten())
    corrupted = batch.canvas_noisy != batch.canvas_clean
    hits = (logits.argmax(-1) == batch.canvas_clean) & corrupted
    accuracy = float(hits.sum()) / max(int(corrupted.sum()), 1)
    return StepLosses(canvas_ce + encoder_weight * encoder_ce, float(canvas_ce.detach()), float(encoder_ce.detach()), accuracy)


def learning_rate(step: int, total_steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: DiffusionGemmaModel, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; decay only on matrices (norm weights and scales are gains, not weights)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                              {"params": gains, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
