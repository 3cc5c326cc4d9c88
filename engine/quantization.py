"""The `quantization_config` of a checkpoint's config.json: which quantized layouts the loader accepts.

Accepted: the compressed-tensors "FP8-dynamic" scheme of the RedHatAI releases (docs/fp8.md):
`quant_method` "compressed-tensors", `format` "float-quantized", config groups whose weights are 8-bit
floats (float8_e4m3fn) with one scale per output channel (strategy "channel", or one per tensor, "tensor"),
symmetric and static, and whose input activations are either absent or 8-bit floats quantised dynamically
per token. Every quantized module then stores `<module>.weight` (FP8) and `<module>.weight_scale`; modules in
the `ignore` list (lm_head, embeddings, router, norms) keep plain weights. Anything else is refused with an
error naming the field, never loaded wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUANT_METHOD = "compressed-tensors"
FP8_FORMAT = "float-quantized"
WEIGHT_STRATEGIES = ("channel", "tensor")


@dataclass(frozen=True)
class Fp8Scheme:
    """A validated FP8-dynamic quantization_config. `ignore` is kept for messages (the tensors themselves say
    which modules are quantized: those that ship a `weight_scale`)."""

    ignore: tuple[str, ...]
    weight_strategies: tuple[str, ...]


def read_quantization(config_json: dict[str, Any]) -> Fp8Scheme | None:
    """None for an unquantized checkpoint; the scheme for FP8-dynamic; ValueError naming the field otherwise."""
    quant = config_json.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ValueError("quantization_config must be a JSON object")
    method = quant.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported: this engine loads only "
                         f"{QUANT_METHOD!r} FP8-dynamic checkpoints (float8_e4m3fn weights with per-channel "
                         "scales); use an unquantized or FP8-dynamic release")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config.config_groups is missing or empty")
    strategies = tuple(_check_group(name, group, quant.get("format")) for name, group in groups.items())
    for field in ("kv_cache_scheme", "sparsity_config"):
        if quant.get(field):
            raise ValueError(f"quantization_config.{field} is not supported (only FP8 weights are)")
    ignore = quant.get("ignore") or []
    return Fp8Scheme(ignore=tuple(str(name) for name in ignore), weight_strategies=strategies)


def _check_group(name: str, group: Any, top_format: Any) -> str:
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, dict):
        raise ValueError(f"{where} must be a JSON object")
    group_format = group.get("format") or top_format
    if group_format != FP8_FORMAT:
        raise ValueError(f"{where}.format {group_format!r} is not supported: only {FP8_FORMAT!r} (FP8 weights "
                         "stored as float8_e4m3fn with a weight_scale) is")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"{where}.weights is missing: only weight quantization is supported")
    _expect(weights, f"{where}.weights", num_bits=8, type="float")
    if weights.get("strategy") not in WEIGHT_STRATEGIES:
        raise ValueError(f"{where}.weights.strategy {weights.get('strategy')!r} is not supported: only "
                         f"{' or '.join(WEIGHT_STRATEGIES)} scales (not group or block scales)")
    if weights.get("symmetric") is False or weights.get("dynamic"):
        raise ValueError(f"{where}.weights must be symmetric and static (no zero points, no dynamic weights)")
    activations = group.get("input_activations")
    if activations is not None:
        _expect(activations, f"{where}.input_activations", num_bits=8, type="float", dynamic=True, strategy="token")
    if group.get("output_activations") is not None:
        raise ValueError(f"{where}.output_activations is not supported")
    return str(weights["strategy"])


def _expect(args: dict[str, Any], where: str, **wanted: Any) -> None:
    for key, value in wanted.items():
        if args.get(key) != value:
            raise ValueError(f"{where}.{key} is {args.get(key)!r}; the FP8-dynamic scheme needs {value!r}")
