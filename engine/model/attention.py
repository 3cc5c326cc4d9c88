"""Self-attention of one layer: projections, q/k/v norms, RoPE, GQA through SDPA with an explicit mask.

Full-attention layers have no v_proj: V is the k_proj output, normalised by the weightless v_norm and
never rotated. Scaling is 1.0 (q_norm/k_norm take the place of 1/sqrt(hd)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, ModelConfig
from .norms import RMSNorm, rms_normalize
from .rope import apply_rope

# Shapes: B rows, T new tokens per row, S keys (past + new), H query heads, G kv heads, hd head dim, D hidden.


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_full = config.layer_types[layer_idx] == FULL
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.layer_kv_heads(layer_idx)
        self.head_dim = config.layer_head_dim(layer_idx)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = None if self.is_full else nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.v_norm = RMSNorm(self.head_dim, eps, with_weight=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, T, H, hd], k [B, T, G, hd], v [B, T, G, hd] (q and k rotated).
        q, k and v share one RMS pass and one weight multiply (heads stacked on one axis: each head is
        normalised on its own, so stacking changes nothing), and q and k one RoPE pass."""
        b, t, _ = x.shape
        heads, groups = self.num_heads, self.kv_heads
        q = self.q_proj(x).view(b, t, heads, self.head_dim)
        raw_k = self.k_proj(x).view(b, t, groups, self.head_dim)
        raw_v = raw_k if self.v_proj is None else self.v_proj(x).view(b, t, groups, self.head_dim)
        stacked = rms_normalize(torch.cat((q, raw_k, raw_v), dim=2), self.q_norm.eps)  # fp32 [B, T, H+2G, hd]
        normed = (stacked * self._stacked_norm_weights()).to(x.dtype)
        q_and_k = apply_rope(normed[:, :, :heads + groups], cos, sin)
        return q_and_k[:, :, :heads], q_and_k[:, :, heads:], normed[:, :, heads + groups:]

    def _stacked_norm_weights(self) -> torch.Tensor:
        """fp32 [H+2G, hd]: q_norm's weight for each query head, k_norm's for each kv head, 1 for v (v_norm
        has no weight)."""
        q_weight, k_weight = self.q_norm.weight, self.k_norm.weight
        if q_weight is None or k_weight is None:
            raise ValueError("q_norm and k_norm must have weights")
        return torch.cat((q_weight.float().expand(self.num_heads, -1), k_weight.float().expand(self.kv_heads, -1),
                          q_weight.new_ones(self.kv_heads, self.head_dim, dtype=torch.float32)))

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, hd], keys/values [B, S, G, hd], mask [B, 1, 1, S] (one row for every query) or
        [B, 1, T, S], which is folded for GQA as [B, 1, R*T, S] where `folds_gqa_queries` (R = H / G, rows in
        the order of the folded queries below; the model folds encoder masks once per forward) -> [B, T, D].
        The mask is bool (True = attend) or, as the model passes it, additive in q's dtype (`additive_mask`)."""
        return self.o_proj(self._attend_heads(q, keys, values, mask))

    def attend_with_past(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: PastKV,
                         past_v: PastKV, mask: PastKV) -> torch.Tensor:
        """Attention of the new tokens' q [B, T, H, hd] over the past keys followed by their own k, v
        [B, T, G, hd] -> [B, T, D].

        `past_k`, `past_v` [B, S, G, hd] and `mask` [B, 1, 1 | T | R*T, S+T] (as in `attend`) cover every row; or
        each is a tuple with one entry per contiguous run of rows ("row groups", in row order: group g holds
        the next past_k[g].shape[0] rows), each group read and masked to its own past width S_g. Groups let
        rows with short contexts skip the keys a long row in the same batch needs: SDPA computes every key
        it is given, masked or not (docs/architecture.md, "Decoder attention row groups")."""
        if isinstance(past_k, torch.Tensor):
            if not isinstance(past_v, torch.Tensor) or not isinstance(mask, torch.Tensor):
                raise TypeError("past_k, past_v and mask must all be tensors or all be tuples")
            return self.attend(q, torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1), mask)
        if isinstance(past_v, torch.Tensor) or isinstance(mask, torch.Tensor):
            raise TypeError("past_k, past_v and mask must be tuples of one entry per row group")
        outs, start = [], 0
        for group_k, group_v, group_mask in zip(past_k, past_v, mask, strict=True):
            end = start + group_k.shape[0]
            keys = torch.cat((group_k, k[start:end]), dim=1)
            values = torch.cat((group_v, v[start:end]), dim=1)
            outs.append(self._attend_heads(q[start:end], keys, values, group_mask))
            start = end
        if start != q.shape[0]:
            raise ValueError(f"row groups cover {start} rows, the batch has {q.shape[0]}")
        return self.o_proj(torch.cat(outs))

    def _attend_heads(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
                      ) -> torch.Tensor:
        """`attend` before the output projection -> [B, T, H*hd]."""
        b, t = q.shape[:2]
        groups, per_group, hd = self.kv_heads, self.num_heads // self.kv_heads, self.head_dim
        if not folds_gqa_queries(q.device):
            # CPU: SDPA's own GQA (the flash kernel indexes kv head h // R) with the mask broadcast over heads.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                 attn_mask=mask, scale=1.0, enable_gqa=per_group > 1)
            return out.transpose(1, 2).reshape(b, t, self.num_heads * hd)
        # GQA by folding each kv head's R query heads into the query axis ([B, G, R*T, hd]): no K/V head
        # copies, and every SDPA backend that takes an explicit mask qualifies (enable_gqa narrows them).
        folded = q.view(b, t, groups, per_group, hd).permute(0, 2, 3, 1, 4).reshape(b, groups, per_group * t, hd)
        out = F.scaled_dot_product_attention(folded, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask, scale=1.0)
        return out.view(b, groups, per_group, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * hd)


def folds_gqa_queries(device: torch.device) -> bool:
    """Whether attention folds each kv head's query heads into the query axis (masks then need one row per
    folded query, [B, 1, R*T, S]) rather than passing `enable_gqa` (masks [B, 1, T, S], broadcast over heads).
    Folding keeps every CUDA SDPA backend that takes a mask; on CPU the flash kernel supports enable_gqa, and
    a folded encoder mask is R times larger: building it cost as much as the attention (docs/benchmarks.md,
    issue 9)."""
    return device.type != "cpu"


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = attend) -> the same mask as SDPA's additive form in `dtype` (0 = attend, -inf =
    masked). SDPA converts a bool mask into exactly this on every call; the model converts each forward's
    masks once, not once per layer (the conversion of folded encoder masks took an eighth of an editing
    session's CPU time, docs/benchmarks.md, issue 9)."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), float("-inf"))


# One tensor for every row of the batch, or one per row group (`Attention.attend_with_past`).
PastKV = torch.Tensor | tuple[torch.Tensor, ...]
