"""RMSNorm as DiffusionGemma uses it: computed in fp32, weight applied directly (no `1 + w`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last dim, in fp32, returned in x's dtype.
    Uses torch's rms_norm (one fused kernel where available: ~330 norms per forward make launch counts
    matter) on fp32 operands, so bf16 inputs are normalised and weighted in fp32 as the release does."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps)
    return normed.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with an optional learned weight (`v_norm`, the router norm and the self-conditioning
    `post_norm` have none, so they own no parameters and no state-dict keys)."""

    def __init__(self, dim: int, eps: float, with_weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
