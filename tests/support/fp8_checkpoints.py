"""Rewrite a saved checkpoint in the compressed-tensors "FP8-dynamic" layout of the RedHatAI releases, written
independently of the engine's loader (plain torch arithmetic here, engine/model/fp8.py there).

Layout: every Linear of the text model (attention projections, dense MLP, self-conditioning MLP) and every
expert stores `<module>.weight` as float8_e4m3fn and `<module>.weight_scale` ([out, 1], per output channel, or
[1] with the tensor strategy); the packed experts are split into the per-expert Linear layout
(`experts.{e}.gate_proj / up_proj / down_proj`); embeddings, router, norms, scalars stay as they were; config.json
gains the `quantization_config`. The companion dequantised folder holds `weight * weight_scale` in fp32 in the
original layout, for the reference to run on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj", "self_conditioning.gate_proj", "self_conditioning.up_proj",
                     "self_conditioning.down_proj")


def fp8_dynamic_config(strategy: str = "channel") -> dict[str, Any]:
    """The quantization_config llm-compressor writes for its FP8_DYNAMIC preset."""
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "float-quantized", "output_activations": None,
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False,
                        "group_size": None, "block_structure": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                  "dynamic": True, "observer": None},
        }},
        "ignore": ["lm_head", "re:.*embed.*", "re:.*router.*", "re:.*norm.*", "re:.*vision.*"],
        "kv_cache_scheme": None, "sparsity_config": {},
    }


def quantize(weight: torch.Tensor, strategy: str, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, stored scale) with weight ~= fp8 * scale; channel: one scale per row [out, 1]."""
    peak = weight.abs().amax(dim=-1, keepdim=True) if strategy == "channel" else weight.abs().amax().reshape(1)
    scale = (peak.float() / torch.finfo(FP8).max).to(scale_dtype)
    broadcast = scale.float() if strategy == "channel" else scale.float().reshape(1, 1)
    return (weight.float() / broadcast).clamp(-448, 448).to(FP8), scale


def write_fp8_pair(source: Path, out_root: Path, strategy: str = "channel",
                   scale_dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """(FP8 folder, dequantised fp32 folder) made from the single-file checkpoint in `source`."""
    tensors = load_file(source / "model.safetensors")
    fp8: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.startswith("model.decoder.") and name.removesuffix(".weight").endswith(QUANTIZED_LINEARS):
            _put(fp8, name.removesuffix(".weight"), tensor, strategy, scale_dtype)
            dense[name] = _dequantized(fp8, name.removesuffix(".weight"))
        elif name.startswith("model.decoder.") and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            dense[name] = _split_experts(fp8, name, tensor, strategy, scale_dtype)
        else:
            fp8[name] = dense[name] = tensor
    fp8_dir, dense_dir = out_root / "fp8", out_root / "dequantized"
    for folder, weights, quantized in ((fp8_dir, fp8, True), (dense_dir, dense, False)):
        shutil.copytree(source, folder)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if quantized:
            config = json.loads((folder / "config.json").read_text())
            config["quantization_config"] = fp8_dynamic_config(strategy)
            (folder / "config.json").write_text(json.dumps(config))
    return fp8_dir, dense_dir


def _put(out: dict[str, torch.Tensor], module: str, weight: torch.Tensor, strategy: str,
         scale_dtype: torch.dtype) -> None:
    out[module + ".weight"], out[module + ".weight_scale"] = quantize(weight, strategy, scale_dtype)


def _dequantized(out: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    weight, scale = out[module + ".weight"].float(), out[module + ".weight_scale"].float()
    return weight * (scale if scale.dim() == 2 else scale.reshape(1, 1))


def _split_experts(out: dict[str, torch.Tensor], name: str, packed: torch.Tensor, strategy: str,
                   scale_dtype: torch.dtype) -> torch.Tensor:
    """Per-expert FP8 Linears from a packed [E, rows, cols] tensor; returns the dequantised packed tensor."""
    prefix = name.rsplit(".", 1)[0]
    restored = torch.empty_like(packed, dtype=torch.float32)
    for expert in range(packed.shape[0]):
        if name.endswith("gate_up_proj"):
            width = packed.shape[1] // 2
            parts = {"gate_proj": (packed[expert, :width], slice(0, width)),
                     "up_proj": (packed[expert, width:], slice(width, 2 * width))}
        else:
            parts = {"down_proj": (packed[expert], slice(None))}
        for part, (weight, rows) in parts.items():
            module = f"{prefix}.{expert}.{part}"
            _put(out, module, weight, strategy, scale_dtype)
            restored[expert, rows] = _dequantized(out, module)
    return restored
