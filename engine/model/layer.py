"""One transformer layer (shared by encoder and decoder modes): attention, dense MLP and MoE in parallel
on the same residual, per-layer scalar."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .moe import Experts, GatedMLP, Router
from .norms import RMSNorm

# Shapes: B rows, T tokens per row, S keys, G kv heads, hd head dim, D hidden.


class TransformerLayer(nn.Module):
    """Parameter names follow the released checkpoint (`layers.{i}.*`)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp = GatedMLP(d, config.intermediate_size)
        self.router = Router(d, config.num_experts, config.top_k_experts, eps)
        self.experts = Experts(config.num_experts, d, config.moe_intermediate_size)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(d, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(d, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(d, eps)
        # A learned scalar stored as a buffer in the checkpoint; it must be loaded, not left at 1.
        self.layer_scalar: torch.Tensor
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, T, D]; past_k/v [B, S_past, G, hd] precede the new tokens' keys; mask [B, 1, T|1, S_past+T].
        Returns (new h, new tokens' k, v [B, T, G, hd]) so the caller can cache them."""
        q, k, v = self.self_attn.project(self.input_layernorm(h), cos, sin)
        keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)
        h = h + self.post_attention_layernorm(self.self_attn.attend(q, keys, values, mask))
        residual = h
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(residual)))
        flat = residual.reshape(-1, residual.shape[-1])
        weights, experts = self.router(flat)  # routes on the raw residual, not a normed copy
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, experts).view_as(residual)
        h = residual + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe))
        return h * self.layer_scalar, k, v
