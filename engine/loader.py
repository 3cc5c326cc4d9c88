"""Load a DiffusionGemma checkpoint (local folder or Hugging Face repo id) into our model.

Weights stream tensor by tensor from safetensors (single file or sharded with
`model.safetensors.index.json`) straight into a model allocated empty on the target device and dtype, so
the host never holds a full copy. Key layout of the release: text weights under `model.decoder.`, the
tied `lm_head.weight` and encoder text weights absent, `model.encoder.language_model.layers.{i}.layer_scalar`
a duplicate of the decoder's (the loader checks that it equals the decoder's: the engine runs one weight stack
in both modes), vision tower / embedder keys skipped.

FP8-dynamic checkpoints (compressed-tensors, engine/quantization.py) are dequantised at load into `dtype`, or
with `fp8_weights` kept in FP8 for `torch._scaled_mm` (engine/model/fp8.py); engine/weight_map.py routes the
tensors, including the per-expert layout onto our packed experts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dgtext.checkpoint_files import resolve_model_dir
from dgtext.tokenizer import PromptTokenizer

from .config import MODEL_TYPE, ModelConfig
from .errors import (
    CheckpointError,
    CorruptShardError,
    MissingCheckpointFileError,
    UnsupportedModelError,
)
from .model import DiffusionGemmaModel
from .quantization import read_quantization
from .types import GenerationDefaults
from .weight_map import SCALE_SUFFIX, WEIGHT_PREFIX, WeightSink, keep_fp8_weights

ENCODER_LAYER_PREFIX = "model.encoder.language_model.layers."
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"

# The sampler fields of generation_config.json; their published defaults are GenerationDefaults' field defaults.
SAMPLER_FIELDS = tuple(f.name for f in fields(GenerationDefaults) if f.name != "stop_token_ids")


@dataclass
class LoadedModel:
    """A ready model plus what the engine needs around it. `generation_defaults` is the sampler defaults
    (engine.types.GenerationDefaults); `generation_config` is the same as a plain dict (spec defaults
    filled in, plus `eos_token_id` list and `pad_token_id`)."""

    model: DiffusionGemmaModel
    config: ModelConfig
    tokenizer: PromptTokenizer
    generation_defaults: GenerationDefaults
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    weights_format: str = "dense"  # "dense", "fp8-dequantized" or "fp8" (weights kept in FP8)


def load_model(model: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               fp8_weights: bool | None = None) -> LoadedModel:
    """Load `model` (folder or repo id) onto `device` in `dtype`, in eval mode without gradients.
    FP8 checkpoints: `fp8_weights` True keeps the quantized weights in FP8 (matmuls in `torch._scaled_mm`,
    activations quantised per token), False dequantises them into `dtype` at load; None chooses FP8 on CUDA
    cards with FP8 matmuls (compute capability 8.9+) in bfloat16, dequantisation elsewhere.
    Raises CheckpointError subclasses (see engine.errors) with messages naming the file or tensor."""
    folder = resolve_model_dir(model)  # default patterns: the serving files
    config = read_model_config(folder)
    net = build_empty_model(config, torch.device(device), dtype)
    quantized = quantized_weight_names(folder) if is_fp8_checkpoint(folder) else set()
    keep = bool(quantized) and (fp8_weights if fp8_weights is not None else _fp8_matmuls_pay(net, dtype))
    if keep:
        keep_fp8_weights(net, quantized)
    load_weights(net, folder, quantized)
    tokenizer = PromptTokenizer.from_dir(folder)
    defaults, generation_config = read_generation_config(folder, config)
    weights_format = ("fp8" if keep else "fp8-dequantized") if quantized else "dense"
    return LoadedModel(net, config, tokenizer, defaults, folder, generation_config, weights_format)


def _fp8_matmuls_pay(net: DiffusionGemmaModel, dtype: torch.dtype) -> bool:
    device = net.embed_tokens.weight.device
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 9))


def is_fp8_checkpoint(folder: Path) -> bool:
    """Whether config.json declares the FP8-dynamic scheme; another quantization format raises
    UnsupportedModelError naming the field."""
    try:
        return read_quantization(_read_json(folder, "config.json", required=True)) is not None
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise UnsupportedModelError(f"{folder / 'config.json'}: {exc}") from exc


def read_model_config(folder: Path) -> ModelConfig:
    """Parse `config.json`; a missing file, another model_type or an unsupported variant raise CheckpointError."""
    config_json = _read_json(folder, "config.json", required=True)
    model_type = config_json.get("model_type")
    if model_type != MODEL_TYPE:
        raise UnsupportedModelError(f"{folder / 'config.json'}: model_type is {model_type!r}, but this engine "
                                    f"serves only {MODEL_TYPE!r} checkpoints (e.g. google/diffusiongemma-26B-A4B-it)")
    try:
        return ModelConfig.from_hf_dict(config_json)
    except (ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"{folder / 'config.json'}: {exc}") from exc


def read_generation_config(folder: Path, config: ModelConfig) -> tuple[GenerationDefaults, dict[str, Any]]:
    """generation_config.json parsed once: as GenerationDefaults (absent fields keep the published defaults,
    absent stop ids come from config.json) and as the plain dict of `LoadedModel.generation_config`."""
    raw = _read_json(folder, "generation_config.json", required=False)
    defaults = GenerationDefaults.from_generation_config(raw, fallback_stop_ids=config.eos_token_ids)
    values: dict[str, Any] = {name: getattr(defaults, name) for name in SAMPLER_FIELDS}
    values["eos_token_id"] = list(defaults.stop_token_ids)
    values["pad_token_id"] = int(raw["pad_token_id"]) if raw.get("pad_token_id") is not None else config.pad_token_id
    return defaults, values


def build_empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> DiffusionGemmaModel:
    """The model with uninitialised parameters allocated directly on `device` in `dtype`."""
    with torch.device("meta"):
        net = DiffusionGemmaModel(config)
    net = net.to(dtype=dtype).to_empty(device=device)
    return net.eval().requires_grad_(False)


def load_weights(net: DiffusionGemmaModel, folder: Path, quantized: set[str] | None = None) -> None:
    """Copy every checkpoint tensor into `net` (casting to its dtype, dequantising FP8 weights unless `net`
    keeps them in FP8); check names, shapes and the encoder's copy of each layer_scalar. `quantized`: the local
    names of the weights that ship a weight_scale (`quantized_weight_names`)."""
    sink = WeightSink(net, quantized or set())
    encoder_scalars: dict[int, torch.Tensor] = {}
    device = next(net.parameters()).device
    for filename in weight_files(folder):
        for name, stored_shape, read in _iter_tensors(folder / filename, device):
            if name.startswith(ENCODER_LAYER_PREFIX) and name.endswith(".layer_scalar"):
                encoder_scalars[int(name[len(ENCODER_LAYER_PREFIX):].split(".")[0])] = read()
            elif name.startswith(WEIGHT_PREFIX):
                sink.put(name[len(WEIGHT_PREFIX):], stored_shape, read, filename)
            # else: the tied head, the vision tower: nothing the text model reads
    sink.check_complete(folder)
    _check_encoder_layer_scalars(net, encoder_scalars, folder)


def _check_encoder_layer_scalars(net: DiffusionGemmaModel, encoder: dict[int, torch.Tensor], folder: Path) -> None:
    """The reference keeps the encoder's `layer_scalar` as a separate buffer (1.0 when the checkpoint has none)
    and multiplies encoder-mode outputs by it; our one weight stack uses the decoder's in both modes, so refuse
    a checkpoint where the two differ (compared in the model dtype) rather than give other encoder logits."""
    differing = []
    for index, layer in enumerate(net.layers):
        decoder = layer.get_buffer("layer_scalar")
        stored = encoder.get(index)
        value = stored.to(decoder.device, decoder.dtype) if stored is not None else torch.ones_like(decoder)
        if value.shape != decoder.shape or not torch.equal(value, decoder):
            differing.append(f"layer {index}: encoder {'absent (1.0)' if stored is None else value.tolist()} "
                             f"vs decoder {decoder.tolist()}")
    if differing:
        raise UnsupportedModelError(
            f"{folder}: the encoder's layer_scalar differs from the decoder's ({'; '.join(differing[:5])}"
            f"{'; ...' if len(differing) > 5 else ''}); this engine runs one weight stack in encoder and decoder "
            f"mode, so it serves only checkpoints where {ENCODER_LAYER_PREFIX}{{i}}.layer_scalar equals "
            f"{WEIGHT_PREFIX}layers.{{i}}.layer_scalar")


def quantized_weight_names(folder: Path) -> set[str]:
    """Local names (after `model.decoder.`) of the weights that come with a `weight_scale`: the FP8 ones."""
    suffix = ".weight" + SCALE_SUFFIX
    names = set()
    for filename in weight_files(folder):
        for name, _, _ in _iter_tensors(folder / filename, torch.device("cpu")):
            if name.startswith(WEIGHT_PREFIX) and name.endswith(suffix):
                names.add(name[len(WEIGHT_PREFIX):-len(SCALE_SUFFIX)])
    return names


def weight_files(folder: Path) -> list[str]:
    """The safetensors files to read: the shards named by the index, else the single file."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptShardError(INDEX_FILE, f"not a valid safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise MissingCheckpointFileError(folder, name, f"{INDEX_FILE} names this shard; download it too")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise MissingCheckpointFileError(folder, f"{SINGLE_FILE} (or {INDEX_FILE} with its shards)",
                                     "the folder holds no weights")


def _iter_tensors(path: Path, device: torch.device) -> Iterator[tuple[str, list[int], Any]]:
    """(name, shape, reader) for each tensor of one safetensors file; read errors become CorruptShardError."""
    try:
        handle = safe_open(str(path), framework="pt", device=str(device))
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise CorruptShardError(path.name, str(exc)) from exc
    with handle as shard:
        for name in shard.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            def read(name: str = name) -> torch.Tensor:
                try:
                    return shard.get_tensor(name)
                except Exception as exc:
                    raise CorruptShardError(path.name, f"tensor {name}: {exc}") from exc
            yield name, list(shard.get_slice(name).get_shape()), read


def _read_json(folder: Path, filename: str, required: bool) -> dict[str, Any]:
    path = folder / filename
    if not path.is_file():
        if required:
            raise MissingCheckpointFileError(folder, filename, "is this a DiffusionGemma checkpoint folder?")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc}); the file is damaged") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
