"""Rotary position embedding (rotate-half style) for both layer types.

Sliding layers rotate every dim pair with theta 1e4. Full layers use "proportional" partial RoPE:
the first `partial_factor * head_dim / 2` frequency pairs use `theta ** (-2j / head_dim)` and the rest
have frequency 0, i.e. pass through unchanged, while the output keeps the full head size.
Frequencies are recomputed per forward from the config (a few tiny kernels): keeping them out of the
state dict means a model built on the meta device needs no buffer re-initialisation.
"""

from __future__ import annotations

import torch

# Shapes: B rows, T tokens per row, H heads, hd head dim.


def inverse_frequencies(head_dim: int, theta: float, partial_factor: float = 1.0, factor: float = 1.0,
                        device: torch.device | None = None) -> torch.Tensor:
    """fp32 [hd/2] inverse frequencies; pairs beyond `partial_factor` of the head have frequency 0."""
    rotated_pairs = int(partial_factor * head_dim // 2)
    exponents = torch.arange(0, 2 * rotated_pairs, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = torch.zeros(head_dim // 2, device=device, dtype=torch.float32)
    inv_freq[:rotated_pairs] = 1.0 / (theta ** exponents)
    return inv_freq / factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, signed sin [B, T, 1, hd] in `dtype` (angles computed in fp32). The first half
    of the sin table is negated (the rotate-half sign), so `apply_rope` needs no negation per layer; the
    head axis is there so every layer broadcasts over its heads without a reshape."""
    angles = positions[..., None].float() * inv_freq
    sin = angles.sin()
    cos = angles.cos()
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, hd] rotated by the tables of `rope_cos_sin` (rotate-half convention:
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin])."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * sin
