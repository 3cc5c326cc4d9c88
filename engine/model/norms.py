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


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The weightless fp32 `x * rsqrt(mean(x^2) + eps)`. Callers that normalise one tensor for several
    weights (or several same-width tensors stacked together) share this one pass and apply each weight
    with `RMSNorm.apply_weight`: on small shapes a norm costs ~6 kernel launches, so sharing them counts."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps)


class RMSNorm(nn.Module):
    """RMSNorm with an optional learned weight (`v_norm`, the router norm and the self-conditioning
    `post_norm` have none, so they own no parameters and no state-dict keys)."""

    def __init__(self, dim: int, eps: float, with_weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def apply_weight(self, normalized: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This norm's output from an fp32 `rms_normalize` of its input: the weight applied in fp32, then
        rounded to `dtype` (the same arithmetic as `forward`)."""
        weighted = normalized if self.weight is None else normalized * self.weight.float()
        return weighted.to(dtype)
