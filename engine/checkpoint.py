"""Write checkpoints in the released DiffusionGemma layout, loadable by our loader and by
`transformers.DiffusionGemmaForBlockDiffusion.from_pretrained`.

Files: config.json, model.safetensors (or shards + model.safetensors.index.json), generation_config.json,
tokenizer.json, tokenizer_config.json, chat_template.jinja.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from dgtext.byte_tokenizer import build_byte_tokenizer
from dgtext.save_tokenizer import save_tokenizer_files
from dgtext.tokenizer import PromptTokenizer

from .config import ModelConfig
from .config import preset as preset_config
from .loader import (
    INDEX_FILE,
    SINGLE_FILE,
    WEIGHT_PREFIX,
    LoadedModel,
    build_empty_model,
    read_generation_config,
)
from .model import DiffusionGemmaModel
from .types import GenerationDefaults

ENCODER_LAYER_PREFIX = "model.encoder.language_model.layers."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TokenizerSource = str | Path | Tokenizer | Callable[[], Tokenizer]


def save_checkpoint(model: DiffusionGemmaModel, config: ModelConfig, out_dir: str | Path,
                    tokenizer: TokenizerSource, generation_defaults: Any = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write `model` (weights in its current dtype) and its files to `out_dir`.

    `tokenizer`: a folder to copy tokenizer files from, a `tokenizers.Tokenizer`, or a zero-argument
    builder returning one (saved with the default chat template). `generation_defaults`: an
    engine.types.GenerationDefaults, a generation_config dict, or None for the spec defaults.
    `max_shard_bytes` splits the weights into shards with an index (None: one file)."""
    out = Path(out_dir)
    tensors = released_state_dict(model)
    _write_small_files(out, config, next(iter(tensors.values())).dtype, tokenizer, generation_defaults)
    _write_weights(tensors, out, max_shard_bytes)
    return out


def _write_small_files(out: Path, config: ModelConfig, dtype: torch.dtype, tokenizer: TokenizerSource,
                       generation_defaults: Any = None) -> None:
    """Everything of a checkpoint but its weights: config.json (with `dtype`), generation_config.json and the
    tokenizer files (arguments as `save_checkpoint`'s)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", {**config.to_hf_dict(), "dtype": str(dtype).removeprefix("torch.")})
    _write_json(out / "generation_config.json", generation_config_dict(config, generation_defaults))
    _write_tokenizer(tokenizer, out)


def released_state_dict(model: DiffusionGemmaModel) -> dict[str, torch.Tensor]:
    """Our parameters under `model.decoder.`, plus the encoder's duplicate `layer_scalar` buffers that the
    release carries (transformers keeps them untied). Tensors stay where the model is; the writer copies
    them to the host one shard at a time."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensors[WEIGHT_PREFIX + name] = tensor.detach()
    for i in range(len(model.layers)):
        tensors[f"{ENCODER_LAYER_PREFIX}{i}.layer_scalar"] = tensors[f"{WEIGHT_PREFIX}layers.{i}.layer_scalar"].clone()
    return tensors


def generation_config_dict(config: ModelConfig, generation_defaults: Any = None) -> dict[str, Any]:
    """generation_config.json content in the reference layout (entropy bound inside `sampler_config`)."""
    published = GenerationDefaults(stop_token_ids=config.eos_token_ids)
    if generation_defaults is None:
        values: dict[str, Any] = published.to_generation_config()
    elif isinstance(generation_defaults, GenerationDefaults):
        values = generation_defaults.to_generation_config()
    elif isinstance(generation_defaults, dict):
        values = {**published.to_generation_config(), **generation_defaults}
    else:
        raise ValueError(f"generation_defaults must be GenerationDefaults, a dict or None, got "
                         f"{type(generation_defaults).__name__}")
    entropy_bound = values.pop("entropy_bound", None)
    sampler = values.get("sampler_config") or {"entropy_bound": published.entropy_bound}
    if entropy_bound is not None:
        sampler = {**sampler, "entropy_bound": entropy_bound}
    values["sampler_config"] = {**sampler, "_cls_name": "EntropyBoundSamplerConfig"}
    values.setdefault("eos_token_id", list(config.eos_token_ids))
    values.setdefault("pad_token_id", config.pad_token_id)
    values.setdefault("bos_token_id", config.bos_token_id)
    values.pop("eos_token_ids", None)
    return values


def write_random_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0,
                            dtype: torch.dtype = torch.float32, max_shard_bytes: int | None = None) -> Path:
    """A randomly initialised checkpoint of a named preset with a byte-level tokenizer of the config's
    vocabulary size (real special-token layout and chat template). Deterministic for a given seed."""
    config = preset_config(preset)
    model = build_empty_model(config, torch.device("cpu"), dtype)
    initialise_random(model, seed)
    return save_checkpoint(model, config, out_dir, lambda: build_byte_tokenizer(config.vocab_size),
                           max_shard_bytes=max_shard_bytes)


def random_model_in_memory(preset: str, device: torch.device | str, dtype: torch.dtype, seed: int,
                           folder: str | Path) -> LoadedModel:
    """A randomly initialised model of a named preset built directly on `device` (no weight file: the
    released model's 26B parameters are 52 GB in bfloat16), with the small files of a checkpoint (config,
    generation config, byte-level tokenizer of the config's vocabulary) written to `folder` and read back as
    `load_model` reads them. The noise is drawn on `device`, so it depends on the device as well as the seed."""
    config = preset_config(preset)
    out = Path(folder)
    _write_small_files(out, config, dtype, lambda: build_byte_tokenizer(config.vocab_size))
    net = build_empty_model(config, torch.device(device), dtype)
    initialise_random(net, seed, noise_device=torch.device(device))
    net.eval().requires_grad_(False)
    defaults, generation_config = read_generation_config(out, config)
    return LoadedModel(net, config, PromptTokenizer.from_dir(out), defaults, out, generation_config)


def initialise_random(model: DiffusionGemmaModel, seed: int, std: float = 0.02,
                      noise_device: torch.device | None = None) -> None:
    """Normal(0, std) matrices and experts; norms, router scales and layer scalars at 1 (the usual init).
    The noise is drawn on the CPU (the same weights on every device) or, with `noise_device`, there."""
    generator = torch.Generator(device=noise_device or "cpu").manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dim() >= 2:
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32,
                                    device=generator.device) * std
                tensor.copy_(noise)
            else:
                tensor.fill_(1.0)


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None) -> None:
    metadata = {"format": "pt"}

    def host(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to("cpu").contiguous() for name, tensor in shard.items()}

    if max_shard_bytes is None:
        save_file(host(tensors), str(out / SINGLE_FILE), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(host(shard), str(out / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_tokenizer(source: TokenizerSource, out: Path) -> None:
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer folder {folder} has no tokenizer.json")
        for name in TOKENIZER_FILES:
            if (folder / name).is_file() and folder.resolve() != out.resolve():
                shutil.copyfile(folder / name, out / name)
        return
    tokenizer = source if isinstance(source, Tokenizer) else source()
    save_tokenizer_files(tokenizer, out)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
