"""Loader: configs, presets, generation defaults, dtypes, and every promised error message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import save_checkpoint
from engine.config import PRESETS, ModelConfig, preset
from engine.errors import (
    CheckpointError,
    CorruptShardError,
    MissingCheckpointFileError,
    MissingTensorsError,
    TensorShapeError,
    UnsupportedModelError,
)
from engine.loader import build_empty_model, load_model


@pytest.fixture
def checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_presets_round_trip_through_hf_dicts() -> None:
    for name, config in PRESETS.items():
        assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config, name
    tiny = preset("tiny")
    assert tiny.full_layer_indices == (2, 5) and tiny.num_experts == 8 and tiny.top_k_experts == 2
    assert (tiny.vocab_size, tiny.hidden_size, tiny.canvas_length, tiny.sliding_window) == (512, 64, 32, 16)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_full_preset_has_the_released_parameter_count() -> None:
    net = build_empty_model(preset("full"), torch.device("meta"), torch.bfloat16)
    total = sum(p.numel() for p in net.parameters())
    experts = sum(p.numel() for n, p in net.named_parameters() if ".experts." in n)
    assert round(total / 1e9, 2) == 25.25 and round(experts / 1e9, 2) == 22.84
    assert preset("full").full_layer_indices == (5, 11, 17, 23, 29)
    released = preset("full").to_hf_dict()
    del released["text_config"]["layer_types"]  # absent: the released pattern, every sixth layer full
    assert ModelConfig.from_hf_dict(released).layer_types == preset("full").layer_types


def test_a_config_with_only_required_fields_gets_the_published_defaults() -> None:
    tiny = preset("tiny").to_hf_dict()["text_config"]
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts", "top_k_experts", "moe_intermediate_size")
    parsed = ModelConfig.from_hf_dict({"model_type": "diffusion_gemma", "text_config": {k: tiny[k] for k in required}})
    assert (parsed.max_position_embeddings, parsed.rms_norm_eps, parsed.final_logit_softcapping,
            parsed.sliding_rope_theta, parsed.full_rope_theta, parsed.full_partial_rotary_factor,
            parsed.full_rope_factor) == (262_144, 1e-6, 30.0, 10_000.0, 1_000_000.0, 0.25, 1.0)
    assert (parsed.pad_token_id, parsed.bos_token_id, parsed.eos_token_ids, parsed.canvas_length) == (0, 2, (1,), 256)


def test_config_validation_is_actionable() -> None:
    good = preset("tiny").to_hf_dict()
    with pytest.raises(ValueError, match="layer_types has 5 entries"):
        ModelConfig.from_hf_dict({**good, "text_config": {**good["text_config"], "layer_types": ["full_attention"] * 5}})
    with pytest.raises(ValueError, match="hidden_activation"):
        ModelConfig.from_hf_dict({**good, "text_config": {**good["text_config"], "hidden_activation": "relu"}})
    with pytest.raises(ValueError, match="text_config"):
        ModelConfig.from_hf_dict({"model_type": "diffusion_gemma"})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        ModelConfig.from_hf_dict({**good, "tie_word_embeddings": False})


def test_constructor_style_full_layer_fields_are_understood() -> None:
    text = {k: v for k, v in preset("tiny").to_hf_dict()["text_config"].items() if k != "per_layer_config"}
    parsed = ModelConfig.from_hf_dict({"model_type": "diffusion_gemma", "canvas_length": 32,
                                       "text_config": {**text, "global_head_dim": 48, "num_global_key_value_heads": 4}})
    assert (parsed.global_head_dim, parsed.num_global_key_value_heads) == (48, 4)


def test_loads_our_checkpoint_with_tokenizer_and_generation_defaults(tiny_checkpoint: Path) -> None:
    loaded = load_model(tiny_checkpoint)
    assert loaded.config == preset("tiny") and loaded.path == tiny_checkpoint
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size and loaded.tokenizer.eos_ids == (1, 106)
    assert loaded.generation_defaults.max_denoising_steps == 48 and loaded.generation_defaults.entropy_bound == 0.1
    assert loaded.generation_config == {"max_new_tokens": 256, "max_denoising_steps": 48, "entropy_bound": 0.1,
                                        "t_min": 0.4, "t_max": 0.8, "confidence_threshold": 0.005,
                                        "stability_threshold": 1, "eos_token_id": [1, 106], "pad_token_id": 0}
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


def test_generation_config_values_override_spec_defaults(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "generation_config.json").write_text(json.dumps(
        {"max_denoising_steps": 12, "sampler_config": {"entropy_bound": 0.3}, "eos_token_id": 1, "pad_token_id": 0}))
    loaded = load_model(checkpoint_copy)
    assert loaded.generation_config["max_denoising_steps"] == 12 and loaded.generation_config["entropy_bound"] == 0.3
    assert loaded.generation_config["eos_token_id"] == [1] and loaded.generation_config["t_max"] == 0.8
    (checkpoint_copy / "generation_config.json").unlink()
    assert load_model(checkpoint_copy).generation_config["eos_token_id"] == [1, 106]  # from config.json


def test_null_sampler_entropy_bound_keeps_the_published_default(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "generation_config.json").write_text(json.dumps({"sampler_config": {"entropy_bound": None}}))
    loaded = load_model(checkpoint_copy)
    assert loaded.generation_defaults.entropy_bound == loaded.generation_config["entropy_bound"] == 0.1


def test_bf16_load_puts_every_tensor_in_the_target_dtype(tiny_checkpoint: Path) -> None:
    bf16 = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.model.state_dict().values())
    fp32 = load_model(tiny_checkpoint)
    for name, tensor in fp32.model.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), bf16.model.state_dict()[name]), name


def test_save_checkpoint_copies_a_tokenizer_folder_and_shards(tiny_checkpoint: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_checkpoint)
    out = save_checkpoint(loaded.model, loaded.config, tmp_path / "resaved", tiny_checkpoint,
                          loaded.generation_defaults, max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (out / "chat_template.jinja").is_file()
    assert "model.encoder.language_model.layers.0.layer_scalar" in index["weight_map"]
    again = load_model(out)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def test_missing_folder_and_offline_repo_id(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read by huggingface_hub at call time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="could not fetch model 'nobody/no-such-model'"):
        load_model("nobody/no-such-model")


def test_missing_config_and_weights(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(MissingCheckpointFileError, match="config.json is missing"):
        load_model(checkpoint_copy)


def test_missing_weights_file_and_missing_shard(checkpoint_copy: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(MissingCheckpointFileError, match="model.safetensors .*is missing; the folder holds no weights"):
        load_model(checkpoint_copy)
    loaded = load_model(tiny_checkpoint)
    sharded = save_checkpoint(loaded.model, loaded.config, tmp_path / "sharded", tiny_checkpoint,
                              max_shard_bytes=300_000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    (sharded / shards[1]).unlink()
    with pytest.raises(MissingCheckpointFileError, match=f"{shards[1]} is missing; model.safetensors.index.json"):
        load_model(sharded)


def test_unsupported_model_type(checkpoint_copy: Path) -> None:
    edit_json(checkpoint_copy / "config.json", model_type="gemma3")
    with pytest.raises(UnsupportedModelError, match="model_type is 'gemma3'.*only 'diffusion_gemma'"):
        load_model(checkpoint_copy)


def test_missing_tensors_are_listed(checkpoint_copy: Path) -> None:
    weights = load_file(checkpoint_copy / "model.safetensors")
    del weights["model.decoder.layers.3.router.per_expert_scale"]
    del weights["model.decoder.layers.0.layer_scalar"]
    save_file(weights, checkpoint_copy / "model.safetensors")
    with pytest.raises(MissingTensorsError) as info:
        load_model(checkpoint_copy)
    assert sorted(info.value.missing) == ["model.decoder.layers.0.layer_scalar",
                                          "model.decoder.layers.3.router.per_expert_scale"]
    assert "model.decoder.layers.3.router.per_expert_scale" in str(info.value)


def test_shape_mismatch_names_tensor_expected_and_found(checkpoint_copy: Path) -> None:
    weights = load_file(checkpoint_copy / "model.safetensors")
    weights["model.decoder.layers.2.self_attn.q_proj.weight"] = torch.zeros(100, 64)
    save_file(weights, checkpoint_copy / "model.safetensors")
    with pytest.raises(TensorShapeError, match=r"layers\.2\.self_attn\.q_proj\.weight has shape \[100, 64\] "
                                               r"but config.json implies \[128, 64\]"):
        load_model(checkpoint_copy)


def test_corrupt_shard_names_the_file(checkpoint_copy: Path) -> None:
    path = checkpoint_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptShardError, match="weights file model.safetensors is corrupt or truncated"):
        load_model(checkpoint_copy)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptShardError, match="model.safetensors"):
        load_model(checkpoint_copy)


def test_repo_id_resolves_from_the_hub_cache_offline(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    """A repo id is fetched through huggingface_hub; offline, a populated cache serves it (HF_HOME layout)."""
    from huggingface_hub import constants

    revision = "0" * 40
    repo_dir = tmp_path / "hub" / "models--acme--dg-tiny"
    shutil.copytree(tiny_checkpoint, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_model("acme/dg-tiny")
    assert loaded.path == repo_dir / "snapshots" / revision and loaded.config == preset("tiny")


def test_unexpected_decoder_tensor_and_missing_tokenizer(checkpoint_copy: Path) -> None:
    weights = load_file(checkpoint_copy / "model.safetensors")
    weights["model.decoder.layers.2.self_attn.v_proj.weight"] = torch.zeros(32, 64)  # full layers have none
    save_file(weights, checkpoint_copy / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match=r"unexpected tensor model\.decoder\.layers\.2\.self_attn\.v_proj"):
        load_model(checkpoint_copy)
    del weights["model.decoder.layers.2.self_attn.v_proj.weight"]
    save_file(weights, checkpoint_copy / "model.safetensors")
    (checkpoint_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_model(checkpoint_copy)


def test_random_model_in_memory_is_what_loading_the_written_random_checkpoint_gives(tmp_path: Path) -> None:
    from engine.checkpoint import random_model_in_memory, write_random_checkpoint

    built = random_model_in_memory("tiny", "cpu", torch.float32, seed=3, folder=tmp_path / "files")
    loaded = load_model(write_random_checkpoint(tmp_path / "ckpt", preset="tiny", seed=3))
    assert built.config == loaded.config
    assert built.generation_defaults == loaded.generation_defaults
    assert built.generation_config == loaded.generation_config
    assert built.tokenizer.encode("caf\u00e9 edit") == loaded.tokenizer.encode("caf\u00e9 edit")
    built_state, loaded_state = built.model.state_dict(), loaded.model.state_dict()
    assert built_state.keys() == loaded_state.keys()
    assert all(torch.equal(built_state[name], loaded_state[name]) for name in built_state)
    assert not (tmp_path / "files" / "model.safetensors").exists()  # only the small files are written
    other_seed = random_model_in_memory("tiny", "cpu", torch.float32, seed=4, folder=tmp_path / "other")
    assert not torch.equal(other_seed.model.embed_tokens.weight, built.model.embed_tokens.weight)
