"""One transformer layer (shared by encoder and decoder modes): attention, dense MLP and MoE in parallel
on the same residual, per-layer scalar."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention, PastKV
from .moe import Experts, GatedMLP, Router
from .norms import RMSNorm, rms_normalize

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

    # Under torch.compile each distinct layer (one per attention kind) is traced and compiled once and reused by
    # every layer of its kind (engine/compiled_step.py): compile time stops growing with depth. Eager: no-op.
    @torch.compiler.nested_compile_region
    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: PastKV,
                past_v: PastKV, mask: PastKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, T, D]; past_k/v [B, S_past, G, hd] precede the new tokens' keys; mask [B, 1, 1 | T | R*T, S_past+T]
        (see `Attention.attend`); or all three per row group (`Attention.attend_with_past`).
        Returns (new h, new tokens' k, v [B, T, G, hd]) so the caller can cache them."""
        q, k, v = self.self_attn.project(self.input_layernorm(h), cos, sin)
        h = h + self.post_attention_layernorm(self.self_attn.attend_with_past(q, k, v, past_k, past_v, mask))
        residual = h
        # The two pre-feedforward norms and the router's weightless norm all normalise the raw residual:
        # one RMS pass serves the three.
        normed = rms_normalize(residual, self.pre_feedforward_layernorm.eps)  # fp32 [B, T, D]
        dense = self.mlp(self.pre_feedforward_layernorm.apply_weight(normed, h.dtype))
        flat_normed = normed.view(-1, normed.shape[-1])
        weights, experts = self.router(flat_normed.to(h.dtype))
        moe_in = self.pre_feedforward_layernorm_2.apply_weight(flat_normed, h.dtype)
        moe = self.experts(moe_in, weights, experts).view_as(residual)
        h = residual + self.post_feedforward_layernorm(self._post_branch_norms(dense, moe))
        if torch.compiler.is_compiling():
            # Inductor (torch 2.13) hands k and v out of this nested region as views into its concatenated
            # keys/values buffers, with a layout the caller reads wrongly: the encoder's cache writes stored
            # garbage (tests/engine/test_compiled_step.py, the inductor encoder test). Copies are returned whole.
            k, v = k.clone(), v.clone()
        return h * self.layer_scalar, k, v

    def _post_branch_norms(self, dense: torch.Tensor, moe: torch.Tensor) -> torch.Tensor:
        """post_feedforward_layernorm_1(dense) + post_feedforward_layernorm_2(moe), both [B, T, D], as one RMS
        pass over the two branches stacked; each branch is rounded to the model dtype before the sum."""
        normed = rms_normalize(torch.stack((dense, moe)), self.post_feedforward_layernorm_1.eps)  # fp32 [2, B, T, D]
        dense_weight, moe_weight = self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight
        if dense_weight is None or moe_weight is None:
            raise ValueError("post_feedforward_layernorm_1 and _2 must have weights")
        weights = torch.stack((dense_weight, moe_weight))
        return (normed * weights.float()[:, None, None, :]).to(dense.dtype).sum(dim=0)
