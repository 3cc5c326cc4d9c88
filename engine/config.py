"""Model configuration: the text part of a DiffusionGemma `config.json`, plus named presets.

`ModelConfig.from_hf_dict` reads the top-level checkpoint config (`model_type == "diffusion_gemma"`,
`text_config`, `canvas_length`); `to_hf_dict` writes one that `transformers` loads as
`DiffusionGemmaForBlockDiffusion`. Every shape, token id and window the engine uses comes from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

MODEL_TYPE = "diffusion_gemma"
SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ACTIVATION = "gelu_pytorch_tanh"

# A minimal vision tower description for checkpoints we write: DiffusionGemma checkpoints always carry a
# vision config, but our text-only checkpoints have no vision weights, so keep the tower that
# `transformers` would randomly initialise as small as possible.
_MINIMAL_VISION_CONFIG = {
    "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4,
    "position_embedding_size": 64, "pooling_kernel_size": 1,
}


@dataclass(frozen=True)
class ModelConfig:
    """Text-model hyperparameters. Full-attention layers use `global_head_dim` / `num_global_key_value_heads`,
    take V from k_proj, and use "proportional" partial RoPE; sliding layers use `head_dim` and a window."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    canvas_length: int
    max_position_embeddings: int = 262_144
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    sliding_rope_theta: float = 10_000.0
    full_rope_theta: float = 1_000_000.0
    full_partial_rotary_factor: float = 0.25
    full_rope_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                             f"{self.num_hidden_layers}; give one type per layer")
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ValueError(f"unsupported layer types {unknown}; expected {SLIDING!r} or {FULL!r}")
        if self.layer_types and self.layer_types[-1] != FULL:
            raise ValueError(f"layer_types ends with {self.layer_types[-1]!r}, but the last layer must be {FULL!r} "
                             "(the transformers reference forces it to full attention, so this config would not run "
                             "as written); make the last entry of layer_types 'full_attention'")
        if not self.final_logit_softcapping > 0:
            raise ValueError(f"final_logit_softcapping must be a positive number, got {self.final_logit_softcapping!r}"
                             "; DiffusionGemma divides its logits by it (the reference cannot run without it)")
        for heads_name in ("num_key_value_heads", "num_global_key_value_heads"):
            if self.num_attention_heads % getattr(self, heads_name):
                raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                 f"{heads_name} ({getattr(self, heads_name)}) for grouped-query attention")
        if not 0 < self.top_k_experts <= self.num_experts:
            raise ValueError(f"top_k_experts must be in 1..num_experts ({self.num_experts}), got {self.top_k_experts}")
        if self.sliding_window < 2 or self.canvas_length < 1:
            raise ValueError(f"sliding_window must be >= 2 and canvas_length >= 1 (got {self.sliding_window}, "
                             f"{self.canvas_length})")
        for name in ("pad_token_id", "bos_token_id", *(f"eos:{i}" for i in self.eos_token_ids)):
            value = int(name[4:]) if name.startswith("eos:") else getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"special token id {name}={value} is outside the vocabulary (size {self.vocab_size})")

    @property
    def full_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def sliding_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    def layer_head_dim(self, layer_idx: int) -> int:
        return self.global_head_dim if self.layer_types[layer_idx] == FULL else self.head_dim

    def layer_kv_heads(self, layer_idx: int) -> int:
        return self.num_global_key_value_heads if self.layer_types[layer_idx] == FULL else self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, config_json: dict[str, Any]) -> ModelConfig:
        """Build from a checkpoint's top-level `config.json` dict. Raises ValueError naming the bad field."""
        if config_json.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {config_json.get('model_type')!r}; this engine serves only "
                             f"{MODEL_TYPE!r} checkpoints")
        text = config_json.get("text_config")
        if not isinstance(text, dict):
            raise ValueError("config.json has no 'text_config' object; a DiffusionGemma config nests the text model there")
        if config_json.get("tie_word_embeddings") is False or text.get("tie_word_embeddings") is False:
            raise ValueError("tie_word_embeddings=false is not supported: the LM head must be the embedding matrix")
        return cls(**_text_fields(text), canvas_length=int(config_json.get("canvas_length") or 256))

    def to_hf_dict(self) -> dict[str, Any]:
        """A top-level `config.json` dict that `transformers.DiffusionGemmaForBlockDiffusion` loads."""
        per_layer = {str(i): {"head_dim": self.global_head_dim, "num_key_value_heads": self.num_global_key_value_heads}
                     for i in self.full_layer_indices}
        text = {
            "model_type": "diffusion_gemma_text", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "per_layer_config": per_layer, "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window, "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts, "moe_intermediate_size": self.moe_intermediate_size,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping, "hidden_activation": SUPPORTED_ACTIVATION,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.sliding_rope_theta},
                FULL: {"rope_type": "proportional", "rope_theta": self.full_rope_theta,
                       "partial_rotary_factor": self.full_partial_rotary_factor,
                       # transformers flags "factor" as unknown, though proportional RoPE reads it: write it only when set.
                       **({"factor": self.full_rope_factor} if self.full_rope_factor != 1.0 else {})},
            },
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids), "tie_word_embeddings": True, "attention_bias": False,
            "use_bidirectional_attention": None,
        }
        return {"model_type": MODEL_TYPE, "architectures": ["DiffusionGemmaForBlockDiffusion"],
                "canvas_length": self.canvas_length, "tie_word_embeddings": True, "text_config": text,
                "vision_config": dict(_MINIMAL_VISION_CONFIG)}

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# What a config.json that omits an optional field gets: the field defaults above, defined once.
_FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}


def _text_fields(text: dict[str, Any]) -> dict[str, Any]:
    """Map the `text_config` dict onto ModelConfig fields, rejecting variants the engine does not implement."""
    _reject_unsupported(text)
    num_layers = int(text["num_hidden_layers"])
    # Absent layer_types: the released pattern with the last layer full, as the reference builds it.
    layer_types = text.get("layer_types") or (*_layer_pattern(num_layers, RELEASE_FULL_EVERY)[:-1], FULL)[:num_layers]
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}; "
                         "give one type per layer")
    global_head_dim, global_kv = _full_layer_overrides(text, layer_types)
    eos = text.get("eos_token_id", list(_FIELD_DEFAULTS["eos_token_ids"]))
    return {
        "vocab_size": int(text["vocab_size"]), "hidden_size": int(text["hidden_size"]),
        "intermediate_size": int(text["intermediate_size"]), "num_hidden_layers": num_layers,
        "num_attention_heads": int(text["num_attention_heads"]),
        "num_key_value_heads": int(text["num_key_value_heads"]),
        "head_dim": int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]),
        "global_head_dim": global_head_dim,
        "num_global_key_value_heads": global_kv if global_kv is not None else int(text["num_key_value_heads"]),
        "layer_types": tuple(layer_types), "sliding_window": int(text.get("sliding_window", 512)),
        "num_experts": int(text["num_experts"]), "top_k_experts": int(text["top_k_experts"]),
        "moe_intermediate_size": int(text["moe_intermediate_size"]),
        "max_position_embeddings": int(text.get("max_position_embeddings", _FIELD_DEFAULTS["max_position_embeddings"])),
        "rms_norm_eps": float(text.get("rms_norm_eps", _FIELD_DEFAULTS["rms_norm_eps"])),
        "final_logit_softcapping": _softcap(text),
        **_rope_fields(text.get("rope_parameters") or {}),
        "pad_token_id": _int_or(text.get("pad_token_id"), _FIELD_DEFAULTS["pad_token_id"]),
        "bos_token_id": _int_or(text.get("bos_token_id"), _FIELD_DEFAULTS["bos_token_id"]),
        "eos_token_ids": tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
    }


def _reject_unsupported(text: dict[str, Any]) -> None:
    if text.get("hidden_activation", SUPPORTED_ACTIVATION) != SUPPORTED_ACTIVATION:
        raise ValueError(f"hidden_activation {text['hidden_activation']!r} is not supported (only {SUPPORTED_ACTIVATION})")
    if text.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported: DiffusionGemma projections have no bias")
    if text.get("use_bidirectional_attention") == "all":
        raise ValueError("use_bidirectional_attention='all' (bidirectional encoder) is not supported; the "
                         "encoder must be causal")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_key_value_heads", "num_experts", "top_k_experts",
                           "moe_intermediate_size") if text.get(k) is None]
    if missing:
        raise ValueError(f"text_config lacks required fields {missing}")


def _rope_fields(rope: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings per layer type; "default" RoPE on full layers is proportional RoPE over the whole head."""
    sliding_rope, full_rope = rope.get(SLIDING) or {}, rope.get(FULL) or {}
    if sliding_rope.get("rope_type", "default") != "default" or sliding_rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"sliding-layer RoPE {sliding_rope} is not supported (expected plain 'default' RoPE)")
    full_type = full_rope.get("rope_type", "proportional")
    if full_type not in ("proportional", "default"):
        raise ValueError(f"full-layer rope_type {full_type!r} is not supported")
    return {
        "sliding_rope_theta": float(sliding_rope.get("rope_theta", _FIELD_DEFAULTS["sliding_rope_theta"])),
        "full_rope_theta": float(full_rope.get("rope_theta", _FIELD_DEFAULTS["full_rope_theta"])),
        "full_partial_rotary_factor": float(full_rope.get("partial_rotary_factor",
                                                          _FIELD_DEFAULTS["full_partial_rotary_factor"])
                                            if full_type == "proportional" else 1.0),
        "full_rope_factor": float(full_rope.get("factor", _FIELD_DEFAULTS["full_rope_factor"])),
    }


def _softcap(text: dict[str, Any]) -> float:
    """The published 30.0 when the field is absent; null or non-numbers are refused (never silently replaced)."""
    if "final_logit_softcapping" not in text:
        return float(_FIELD_DEFAULTS["final_logit_softcapping"])
    value = text["final_logit_softcapping"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"final_logit_softcapping must be a positive number, got {value!r}; DiffusionGemma divides "
                         "its logits by it (the reference cannot run without it)")
    return float(value)


def _int_or(value: Any, default: int) -> int:
    return default if value is None else int(value)


def _full_layer_overrides(text: dict[str, Any], layer_types: Sequence[str]) -> tuple[int, int | None]:
    """(head_dim, kv_heads) of the full-attention layers, from `per_layer_config` (saved form) or
    `global_head_dim` / `num_global_key_value_heads` (constructor form). All full layers must agree."""
    per_layer = text.get("per_layer_config")
    if not per_layer:
        return int(text.get("global_head_dim", 512)), text.get("num_global_key_value_heads")
    if any(not 0 <= int(k) < len(layer_types) for k in per_layer):
        raise ValueError(f"per_layer_config names layers {sorted(per_layer)} outside 0..{len(layer_types) - 1}")
    overrides = {(int(v.get("head_dim", 512)), v.get("num_key_value_heads"))
                 for k, v in per_layer.items() if layer_types[int(k)] == FULL}
    if len(overrides) != 1:
        raise ValueError(f"full-attention layers must share one head_dim / num_key_value_heads, got {sorted(overrides)}")
    head_dim, kv = overrides.pop()
    if kv is None:
        kv = text.get("num_global_key_value_heads")
    return head_dim, (int(kv) if kv is not None else None)


# The released layer pattern: every sixth layer is full attention, the others sliding.
RELEASE_FULL_EVERY = 6


def _layer_pattern(num_layers: int, full_every: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % full_every == 0 else SLIDING for i in range(num_layers))


PRESETS: dict[str, ModelConfig] = {
    # CPU tests: full layers at 2 and 5, sliding window shorter than a two-canvas context.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        layer_types=_layer_pattern(6, 3), sliding_window=16, num_experts=8, top_k_experts=2,
        moe_intermediate_size=32, canvas_length=32, max_position_embeddings=8192, eos_token_ids=(1, 106)),
    # Trainable on a workstation; same layer pattern as the release.
    "small": ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
        layer_types=_layer_pattern(12, RELEASE_FULL_EVERY), sliding_window=128, num_experts=16, top_k_experts=4,
        moe_intermediate_size=128, canvas_length=64, max_position_embeddings=32768, eos_token_ids=(1, 106)),
    # The vocabulary pass at the released vocabulary and canvas on a CPU: tiny's layers, 262,144 ids, 256-token
    # canvases (benchmarks of the sampler and LM head: bench/vocab_pass_bench.py, bench/engine_bench.py).
    "widevocab": ModelConfig(
        vocab_size=262_144, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        layer_types=("sliding_attention", "full_attention"), sliding_window=128, num_experts=8, top_k_experts=2,
        moe_intermediate_size=32, canvas_length=256, max_position_embeddings=8192, eos_token_ids=(1, 106)),
    # Released google/diffusiongemma-26B-A4B-it text shapes.
    "full": ModelConfig(
        vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
        layer_types=_layer_pattern(30, RELEASE_FULL_EVERY), sliding_window=1024, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704, canvas_length=256, max_position_embeddings=262_144, eos_token_ids=(1, 106, 50)),
}


def preset(name: str) -> ModelConfig:
    """A named preset (`tiny`, `small`, `full`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
