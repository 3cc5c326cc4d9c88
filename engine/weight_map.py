"""Where each checkpoint tensor goes in our model, and the FP8 pairs (`weight` + `weight_scale`) on the way.

Names are local (after `model.decoder.`). Besides our own names, the per-expert layout of compressed-tensors
checkpoints (`layers.{l}.experts.{e}.{gate_proj,up_proj,down_proj}.weight`, each a Linear) maps onto slices of
the packed `experts.gate_up_proj [E, 2I, D]` (gate = first I rows) and `experts.down_proj [E, D, I]`.
An FP8 weight goes either into an FP8 buffer of the same shape plus its fp32 per-row scales (weights kept in
FP8: `FP8Linear`, `Experts.keep_fp8`), or, dequantised, into the plain parameter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import MissingTensorsError, TensorShapeError, UnsupportedModelError
from .model import DiffusionGemmaModel
from .model.fp8 import FP8_DTYPE, FP8Linear, dequantize, row_scales
from .model.moe import Experts

WEIGHT_PREFIX = "model.decoder."
SCALE_SUFFIX = "_scale"  # `x.weight_scale` is the scale of `x.weight`
PER_EXPERT = re.compile(r"^(layers\.\d+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
Index = tuple[int | slice, ...]


def keep_fp8_weights(net: DiffusionGemmaModel, quantized: Iterable[str]) -> None:
    """Turn the modules whose weights the checkpoint ships in FP8 (`quantized`: local weight names that have a
    `weight_scale`) into FP8 modules, so the loader fills them without dequantising. Other modules stay dense
    (e.g. a quantized embedding, which is dequantised)."""
    experts = set()
    for name in quantized:
        match = PER_EXPERT.match(name)
        if match:
            experts.add(match.group(1))
            continue
        module_name = name.removesuffix(".weight")
        module = _submodule(net, module_name)
        if isinstance(module, nn.Linear):
            net.set_submodule(module_name, FP8Linear.like(module))
    for module_name in experts:
        module = _submodule(net, module_name)
        if not isinstance(module, Experts):
            raise UnsupportedModelError(f"{WEIGHT_PREFIX}{module_name} is not an experts block")
        module.keep_fp8()


def _submodule(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError as exc:
        raise UnsupportedModelError(f"the checkpoint quantizes {WEIGHT_PREFIX}{name}, which this config.json's model "
                                    "does not have") from exc


class WeightSink:
    """Copies checkpoint tensors into `net` and tracks which elements of each target were filled."""

    def __init__(self, net: DiffusionGemmaModel, quantized: set[str]) -> None:
        self.net, self.quantized = net, quantized
        self.targets = dict(net.state_dict(keep_vars=True))
        self.filled: dict[str, int] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self.expert_size = net.config.moe_intermediate_size

    def put(self, local: str, stored_shape: list[int], read: Callable[[], torch.Tensor], filename: str) -> None:
        """Route one tensor: FP8 halves wait for their partner; everything else is copied (cast) at once."""
        base = local.removesuffix(SCALE_SUFFIX) if local.endswith(".weight" + SCALE_SUFFIX) else local
        if base in self.quantized:
            parts = self._pending.setdefault(base, {})
            parts["scale" if base != local else "weight"] = read()
            if len(parts) == 2:
                del self._pending[base]
                self._put_fp8(base, parts["weight"], parts["scale"], filename)
            return
        name, view = self._view(local, filename)
        if view.dtype == FP8_DTYPE:
            raise UnsupportedModelError(f"{filename}: {WEIGHT_PREFIX}{local} has no weight_scale, but other experts "
                                        "of its layer are FP8; quantize all experts of a layer or none")
        self._check_shape(local, view, stored_shape, filename)
        tensor = read()
        if tensor.dtype == FP8_DTYPE:  # without its scale it would load off by that factor
            raise MissingTensorsError(filename, [WEIGHT_PREFIX + local + SCALE_SUFFIX])
        with torch.no_grad():
            view.copy_(tensor)
        self._fill(name, view)

    def _put_fp8(self, local: str, weight: torch.Tensor, scale: torch.Tensor, filename: str) -> None:
        if weight.dtype != FP8_DTYPE:
            raise UnsupportedModelError(f"{filename}: {WEIGHT_PREFIX}{local} has a weight_scale but is stored as "
                                        f"{weight.dtype}; FP8-dynamic weights are float8_e4m3fn")
        name, view = self._view(local, filename)
        self._check_shape(local, view, list(weight.shape), filename)
        try:
            scales = row_scales(scale, weight.shape[-2])
        except ValueError as exc:
            raise TensorShapeError(WEIGHT_PREFIX + local + SCALE_SUFFIX, (weight.shape[-2], 1), scale.shape,
                                   filename) from exc
        with torch.no_grad():
            if view.dtype == FP8_DTYPE:  # kept in FP8: the raw weight, and its per-row scales at the same index
                scale_name = name + SCALE_SUFFIX
                scale_view = self.targets[scale_name][self._index_of(local)]
                view.copy_(weight)
                scale_view.copy_(scales)
                self._fill(scale_name, scale_view)
            else:
                view.copy_(dequantize(weight, scale, view.dtype))
        self._fill(name, view)

    def check_complete(self, folder: object) -> None:
        """Raise if an FP8 weight came without its scale (or the reverse) or a target was not filled."""
        if self._pending:  # each pending entry holds one half: name the other
            raise MissingTensorsError(folder, [WEIGHT_PREFIX + base + ("" if "scale" in parts else SCALE_SUFFIX)
                                               for base, parts in sorted(self._pending.items())])
        missing = [WEIGHT_PREFIX + k for k, t in self.targets.items() if self.filled.get(k, 0) != t.numel()]
        if missing:
            raise MissingTensorsError(folder, missing)

    # ----- name mapping -----

    def _view(self, local: str, filename: str) -> tuple[str, torch.Tensor]:
        """(target name, the tensor or slice the checkpoint tensor `local` fills)."""
        if local in self.targets:
            return local, self.targets[local]
        match = PER_EXPERT.match(local)
        if match is None:
            raise UnsupportedModelError(f"{filename}: unexpected tensor {WEIGHT_PREFIX}{local} for this config.json "
                                        "(e.g. a v_proj on a full-attention layer); the weights do not match it")
        packed = f"{match.group(1)}.{'down_proj' if match.group(3) == 'down_proj' else 'gate_up_proj'}"
        return packed, self.targets[packed][self._index_of(local)]

    def _index_of(self, local: str) -> Index:
        """The slice of the packed expert tensor a per-expert tensor fills ([e] or [e, rows])."""
        match = PER_EXPERT.match(local)
        if match is None:
            return ()
        expert, part, width = int(match.group(2)), match.group(3), self.expert_size
        rows = {"gate_proj": slice(0, width), "up_proj": slice(width, 2 * width), "down_proj": slice(None)}[part]
        return (expert, rows)

    def _check_shape(self, local: str, view: torch.Tensor, stored_shape: list[int], filename: str) -> None:
        if tuple(stored_shape) != tuple(view.shape):
            raise TensorShapeError(WEIGHT_PREFIX + local, view.shape, stored_shape, filename)

    def _fill(self, name: str, view: torch.Tensor) -> None:
        self.filled[name] = self.filled.get(name, 0) + view.numel()
