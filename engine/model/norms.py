"""RMSNorm as DiffusionGemma uses it: computed in fp32, weight applied directly (no `1 + w`)."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last dim, in fp32, returned in x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * weight.float()
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
