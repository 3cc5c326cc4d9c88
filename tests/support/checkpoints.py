"""Tiny DiffusionGemma checkpoints for tests: random reference models saved by `transformers`, and
random checkpoints written by our own `engine.checkpoint` writer.

The reference builders import `transformers` lazily (a test-only dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.model import DiffusionGemmaModel

# Small enough to build and save in well under a second; full layers at 2 and 5, a window shorter
# than a two-canvas context so the sliding ring wraps.
TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
    "num_global_key_value_heads": 1, "sliding_window": 16,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                    "sliding_attention", "sliding_attention", "full_attention"],
    "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32, "max_position_embeddings": 4096,
    "eos_token_id": [1, 106],
}
TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4,
    "position_embedding_size": 64, "pooling_kernel_size": 1,
}
TINY_CANVAS = 32


def build_reference_model(seed: int = 0, canvas_length: int = TINY_CANVAS, **text_overrides: Any):
    """A random fp32 `transformers.DiffusionGemmaForBlockDiffusion` with every parameter and buffer
    perturbed away from its default (norm weights, router scales, per-expert scales, layer scalars), so
    that a loader that drops or misroutes any of them fails parity."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(text_config={**TINY_TEXT_CONFIG, **text_overrides},
                                  vision_config=dict(TINY_VISION_CONFIG), canvas_length=canvas_length)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in [*model.model.decoder.named_parameters(), *model.model.decoder.named_buffers()]:
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("layer_scalar") or name.endswith("per_expert_scale"):
                tensor.copy_(0.5 + noise.abs())
            elif "norm" in name or name.endswith("router.scale"):
                tensor.copy_(1.0 + 0.3 * noise)
            elif tensor.is_floating_point() and tensor.dim() >= 2:
                tensor.copy_(0.08 * noise)
        # The encoder's layer_scalar buffers are separate (untied) copies; keep them equal, as released.
        for enc, dec in zip(model.model.encoder.language_model.layers, model.model.decoder.layers, strict=True):
            enc.layer_scalar.copy_(dec.layer_scalar)
    return model


def save_reference_checkpoint(out_dir: str | Path, seed: int = 0, max_shard_size: str | None = None,
                              **text_overrides: Any) -> Path:
    """`save_pretrained` a random reference model (sharded when `max_shard_size` is given) plus a byte-level
    tokenizer and chat template, as a released folder has; returns the folder."""
    from dgtext.byte_tokenizer import build_byte_tokenizer
    from dgtext.save_tokenizer import save_tokenizer_files

    out = Path(out_dir)
    model = build_reference_model(seed, **text_overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    save_tokenizer_files(build_byte_tokenizer(model.config.text_config.vocab_size), out)
    return out


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """A random checkpoint of the `tiny` preset written by our own writer (with byte tokenizer)."""
    from engine.checkpoint import write_random_checkpoint

    return write_random_checkpoint(out_dir, preset="tiny", seed=seed)


def random_model(config: ModelConfig, seed: int = 0) -> DiffusionGemmaModel:
    """An eval-mode `DiffusionGemmaModel` of `config` with random weights in memory (no checkpoint):
    matrices N(0, 0.1), vectors (norm weights, layer scalars) U(0.5, 1.5), so that norms and scalars are
    not left at their initial ones."""
    from engine.model import DiffusionGemmaModel

    torch.manual_seed(seed)
    net = DiffusionGemmaModel(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
    return net
