"""FP8 weights in the compressed-tensors "FP8-dynamic" scheme: float8_e4m3fn weights with one scale per output
row (per channel), activations quantised per token at run time.

One function, `row_scales`, turns a checkpoint's `weight_scale` into the fp32 per-row scales that both paths
use: `dequantize` (weights dequantised at load: the CPU default, exact against the reference on the same
dequantised weights) and `scaled_linear` (weights kept in FP8, the matmul in `torch._scaled_mm` with row-wise
scales: the CUDA path, which this torch also runs on CPU, so tests exercise it there).
"""

from __future__ import annotations

import torch
from torch import nn

# Shapes: N rows (tokens), K input features, R output rows, E experts.

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


def row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint `weight_scale` -> fp32 [..., R]. Accepts the channel strategy ([..., R, 1] or [..., R]) and the
    tensor strategy (one element, per tensor or per expert [..., 1, 1]), which is expanded to every row."""
    scale = scale.to(torch.float32)
    if scale.dim() >= 1 and scale.shape[-1] == 1 and (scale.dim() >= 2 or rows != 1):
        scale = scale.squeeze(-1)  # [.., R, 1] -> [.., R]; [.., 1, 1] -> [.., 1]
    if scale.dim() == 0:
        scale = scale.reshape(1)
    if scale.shape[-1] not in (1, rows):
        raise ValueError(f"weight_scale has shape {list(scale.shape)}; expected one scale per output row ({rows}) "
                         "or one per tensor")
    return scale.expand(*scale.shape[:-1], rows).contiguous()


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 weight [..., R, K] times its per-row scale, in fp32, then cast to `dtype`."""
    return (weight.to(torch.float32) * row_scales(scale, weight.shape[-2])[..., None]).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantisation: x [N, K] -> (FP8 [N, K], fp32 scales [N, 1]) with x ~= q * scale.
    An all-zero row gets scale 1 (not 0) so nothing divides by zero."""
    x32 = x.to(torch.float32)
    peak = x32.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(peak > 0, peak / FP8_MAX, torch.ones_like(peak))
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (weight FP8 [R, K] * scale fp32 [R]).T -> [..., R] in x's dtype: activations quantised per
    token, one `torch._scaled_mm` with row-wise scales (weight.t() is column-major, as the CUDA kernel needs)."""
    flat = x.reshape(-1, x.shape[-1])
    quantized, x_scale = quantize_rows(flat)
    out = torch._scaled_mm(quantized, weight.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Module):
    """A bias-free Linear whose weight stays FP8: `weight` float8_e4m3fn [R, K], `weight_scale` fp32 [R]
    (the checkpoint's names, so the loader fills them like any other tensor)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def like(cls, linear: nn.Linear) -> FP8Linear:
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias; DiffusionGemma projections have none")
        return cls(linear.in_features, linear.out_features, linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_linear(x, self.weight, self.weight_scale)


# Probe results by device type: a plain dict that torch.compile reads as constants (engine/model/moe.py,
# `probe_expert_kernels`, fills it before compiling; a traced probe would break the graph on its host read).
_SCALED_GROUPED_MM_WORKS: dict[str, bool] = {}


def scaled_grouped_mm_works(device_type: str) -> bool:
    """Whether `torch._scaled_grouped_mm` runs with row-wise scales here (CUDA SM90+ in this torch; the CPU has no
    kernel, so the experts there loop over `scaled_linear`, or run densely under torch.compile); probed once."""
    if device_type not in _SCALED_GROUPED_MM_WORKS:
        _SCALED_GROUPED_MM_WORKS[device_type] = _probe_scaled_grouped_mm(device_type)
    return _SCALED_GROUPED_MM_WORKS[device_type]


def _probe_scaled_grouped_mm(device_type: str) -> bool:
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False
    try:
        x = torch.ones(32, 16, device=device_type).to(FP8_DTYPE)
        w = torch.ones(2, 16, 16, device=device_type).to(FP8_DTYPE)
        offs = torch.tensor([16, 32], dtype=torch.int32, device=device_type)
        got = torch._scaled_grouped_mm(x, w.transpose(1, 2), scale_a=torch.ones(32, device=device_type),
                                       scale_b=torch.ones(2, 16, device=device_type), offs=offs,
                                       out_dtype=torch.bfloat16)
        return bool((got.float() == 16).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def scaled_grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor
                          ) -> torch.Tensor:
    """Expert-sorted x [P, K] through FP8 experts weight [E, R, K] with scales fp32 [E, R]; offs int32 [E] are the
    group ends. One `torch._scaled_grouped_mm` (CUDA only, see `scaled_grouped_mm_works`) -> [P, R] bf16."""
    quantized, x_scale = quantize_rows(x)
    return torch._scaled_grouped_mm(quantized, weight.transpose(1, 2), scale_a=x_scale.squeeze(-1), scale_b=scale,
                                    offs=offs, out_dtype=x.dtype)
