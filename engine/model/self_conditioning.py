"""Self-conditioning block of the decoder input: `post_norm(embed(x) + mlp(pre_norm(soft)))`."""

from __future__ import annotations

import torch
from torch import nn

from .moe import gelu_tanh
from .norms import RMSNorm

# Shapes: B canvases, C canvas length, D hidden, F intermediate.


class SelfConditioning(nn.Module):
    """Parameter names follow the checkpoint (`self_conditioning.{pre_norm,gate_proj,up_proj,down_proj}`);
    `post_norm` has no weight. The decoder input is RMS-normalised even without a signal."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(hidden_size, eps)
        self.post_norm = RMSNorm(hidden_size, eps, with_weight=False)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, token_embeds: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        """token_embeds [B, C, D]; soft_embeds [B, C, D] or None (= zeros, whose MLP output is exactly 0)."""
        if soft_embeds is None:
            return self.post_norm(token_embeds)
        normed = self.pre_norm(soft_embeds)
        signal = self.down_proj(gelu_tanh(self.gate_proj(normed)) * self.up_proj(normed))
        return self.post_norm(token_embeds + signal)
