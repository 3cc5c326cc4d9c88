"""Model FLOPs of the work a request needs: what an engine without padding, masked keys or recomputation
must compute, from the config alone (no torch).

Benchmarks use it to say what a workload allows: the ratio of two settings' FLOPs (prefix cache off over on)
is the speed-up an engine bound by arithmetic would reach, whatever its overheads (docs/benchmarks.md,
issue 9). A multiply-add counts as two FLOPs. Counted: every matmul of the layers (attention projections,
dense MLP, router, the K routed experts of each token), attention's QK^T and PV over the keys a token must
see, and, per decoder token and step, the LM head, the self-conditioning soft embedding (softmax @ E) and
the self-conditioning MLP. Not counted: norms, RoPE, softmax, the sampler's elementwise passes (each linear
in the hidden or vocabulary size, a few percent at most).

Keys a token sees (engine/model/transformer.py): an encoded token at position p sees positions 0..p on
full-attention layers and the last `sliding_window` of them on sliding layers (itself included); a canvas
token sees the `context` cached positions (sliding layers: the last `sliding_window - 1`) and the whole canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import FULL, ModelConfig


def layer_matmul_flops(config: ModelConfig, layer_idx: int) -> int:
    """FLOPs of one token through layer `layer_idx`'s matmuls (attention's QK^T and PV excluded)."""
    d, heads = config.hidden_size, config.num_attention_heads
    kv_heads, head_dim = config.layer_kv_heads(layer_idx), config.layer_head_dim(layer_idx)
    kv_projections = 1 if config.layer_types[layer_idx] == FULL else 2  # full layers use k as v (no v_proj)
    attention = d * heads * head_dim + kv_projections * d * kv_heads * head_dim + heads * head_dim * d
    dense_mlp = 3 * d * config.intermediate_size
    router = d * config.num_experts
    experts = config.top_k_experts * 3 * d * config.moe_intermediate_size
    return 2 * (attention + dense_mlp + router + experts)


def attention_flops_per_key(config: ModelConfig, layer_idx: int) -> int:
    """FLOPs of one query token against one key in layer `layer_idx`: QK^T and PV over every query head."""
    return 4 * config.num_attention_heads * config.layer_head_dim(layer_idx)


def encode_flops(config: ModelConfig, start: int, count: int) -> int:
    """FLOPs of encoding `count` tokens at positions start.. (causal: each sees itself and what precedes it)."""
    if start < 0 or count < 0:
        raise ValueError(f"encode_flops needs start >= 0 and count >= 0, got {start}, {count}")
    end = start + count
    full_keys = (end * (end + 1) - start * (start + 1)) // 2  # sum of p + 1 over p in start..end-1
    total = 0
    for layer_idx, kind in enumerate(config.layer_types):
        keys = full_keys if kind == FULL else _sliding_keys(start, end, config.sliding_window)
        total += count * layer_matmul_flops(config, layer_idx) + keys * attention_flops_per_key(config, layer_idx)
    return total


def _sliding_keys(start: int, end: int, window: int) -> int:
    """sum of min(p + 1, window) over p in start..end-1."""
    ramp_end = min(end, max(start, window - 1))  # positions p < window - 1 see p + 1 keys
    ramp = (ramp_end * (ramp_end + 1) - start * (start + 1)) // 2 if ramp_end > start else 0
    return ramp + (end - max(ramp_end, start)) * window


def denoise_step_flops(config: ModelConfig, context: int) -> int:
    """FLOPs of one decoder step of one canvas after `context` cached positions (LM head and
    self-conditioning included)."""
    if context < 0:
        raise ValueError(f"denoise_step_flops needs context >= 0, got {context}")
    canvas, d = config.canvas_length, config.hidden_size
    total = 0
    for layer_idx, kind in enumerate(config.layer_types):
        past = context if kind == FULL else min(context, config.sliding_window - 1)
        total += canvas * (layer_matmul_flops(config, layer_idx)
                           + (past + canvas) * attention_flops_per_key(config, layer_idx))
    head_and_soft_embedding = 2 * (2 * d * config.vocab_size)
    self_conditioning_mlp = 2 * 3 * d * config.intermediate_size
    return total + canvas * (head_and_soft_embedding + self_conditioning_mlp)


@dataclass(frozen=True)
class RequestFlops:
    encode: int  # prompt (less the cached prefix), infill leading text, committed canvases
    denoise: int  # every decoder step of every canvas

    @property
    def total(self) -> int:
        return self.encode + self.denoise


def request_flops(config: ModelConfig, prompt_tokens: int, cached_tokens: int,
                  leading_tokens: Sequence[int], steps: Sequence[int]) -> RequestFlops:
    """FLOPs of one request as the engine schedules it (engine/scheduler.py): the prompt after its
    `cached_tokens` cached prefix, then for canvas k (`leading_tokens[k]` tokens of infill text before it,
    `steps[k]` decoder steps on it) its leading text, its steps, and, before canvas k + 1, the commit of its
    `canvas_length` tokens. One entry per canvas in both sequences (leading 0 for plain generation)."""
    if len(leading_tokens) != len(steps) or not steps:
        raise ValueError(f"one leading count and one step count per canvas, got {len(leading_tokens)} and "
                         f"{len(steps)}")
    if not 0 <= cached_tokens <= prompt_tokens:
        raise ValueError(f"cached_tokens must be within 0..prompt_tokens, got {cached_tokens} of {prompt_tokens}")
    encode = encode_flops(config, cached_tokens, prompt_tokens - cached_tokens)
    position, denoise = prompt_tokens, 0
    for index, (leading, canvas_steps) in enumerate(zip(leading_tokens, steps, strict=True)):
        if index:  # the previous canvas is committed together with this canvas's leading text
            encode += encode_flops(config, position, config.canvas_length + leading)
            position += config.canvas_length + leading
        else:
            encode += encode_flops(config, position, leading)
            position += leading
        denoise += canvas_steps * denoise_step_flops(config, position)
    return RequestFlops(encode=encode, denoise=denoise)
