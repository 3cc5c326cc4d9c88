"""Load a DiffusionGemma checkpoint (local folder or Hugging Face repo id) into our model.

Weights stream tensor by tensor from safetensors (single file or sharded with
`model.safetensors.index.json`) straight into a model allocated empty on the target device and dtype, so
the host never holds a full copy. Key layout of the release: text weights under `model.decoder.`, the
tied `lm_head.weight` and encoder text weights absent, `model.encoder.language_model.layers.{i}.layer_scalar`
a duplicate of the decoder's, vision tower / embedder keys skipped.
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
    MissingTensorsError,
    TensorShapeError,
    UnsupportedModelError,
)
from .model import DiffusionGemmaModel
from .types import GenerationDefaults

WEIGHT_PREFIX = "model.decoder."
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


def load_model(model: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `model` (folder or repo id) onto `device` in `dtype`, in eval mode without gradients.
    Raises CheckpointError subclasses (see engine.errors) with messages naming the file or tensor."""
    folder = resolve_model_dir(model)  # default patterns: the serving files
    config = read_model_config(folder)
    net = build_empty_model(config, torch.device(device), dtype)
    load_weights(net, folder)
    tokenizer = PromptTokenizer.from_dir(folder)
    defaults, generation_config = read_generation_config(folder, config)
    return LoadedModel(net, config, tokenizer, defaults, folder, generation_config)


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


def load_weights(net: DiffusionGemmaModel, folder: Path) -> None:
    """Copy every checkpoint tensor into `net` (casting to its dtype); check names and shapes."""
    targets = dict(net.state_dict(keep_vars=True))
    loaded: set[str] = set()
    device = next(net.parameters()).device
    for filename in weight_files(folder):
        for name, stored_shape, read in _iter_tensors(folder / filename, device):
            if not name.startswith(WEIGHT_PREFIX):
                continue  # encoder duplicates, tied head, vision tower: nothing the text model reads
            local = name[len(WEIGHT_PREFIX):]
            target = targets.get(local)
            if target is None:
                raise UnsupportedModelError(f"{filename}: unexpected tensor {name} for this config.json "
                                            "(e.g. a v_proj on a full-attention layer); the weights do not match it")
            if tuple(stored_shape) != tuple(target.shape):
                raise TensorShapeError(name, target.shape, stored_shape, filename)
            with torch.no_grad():
                target.copy_(read())
            loaded.add(local)
    missing = [WEIGHT_PREFIX + k for k in targets if k not in loaded]
    if missing:
        raise MissingTensorsError(folder, missing)


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
