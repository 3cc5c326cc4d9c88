"""engine/flops.py: the analytic FLOPs equal what torch's FLOP counter counts on the model's own forwards
(matmuls exactly; attention where the engine reads no masked key), and the key sums equal brute force."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import FULL, SLIDING, preset
from engine.flops import (
    attention_flops_per_key,
    denoise_step_flops,
    encode_flops,
    layer_matmul_flops,
    request_flops,
)
from engine.kv_cache import KVCache
from engine.model.moe import probe_expert_kernels
from tests.support.checkpoints import random_model

TINY = preset("tiny")
ALL_FULL = TINY.replace(layer_types=(FULL,) * TINY.num_hidden_layers)
ATTENTION_OP = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """[P, K] x [E, K, O] with row offsets: every row meets one expert's [K, O]."""
    return 2 * out_shape[0] * out_shape[1] * a_shape[1]


def _cpu_attention_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None,
                         **kwargs: Any) -> int:
    """q [b, h, q, d] against k [b, g, k, d] and v [b, g, k, dv]: every key the kernel is given."""
    b, h, queries, d = q_shape
    return 2 * b * h * queries * k_shape[2] * (d + v_shape[3])


def counted(run: Any) -> tuple[int, int]:
    """(matmul FLOPs, attention FLOPs) that torch's counter sees while `run()` executes."""
    probe_expert_kernels(torch.device("cpu"), torch.float32)  # its one-off check multiplies too: not counted
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops,
                                                             ATTENTION_OP: _cpu_attention_flops})
    with counter:
        run()
    per_op = counter.get_flop_counts()["Global"]
    attention = sum(flops for op, flops in per_op.items() if op is ATTENTION_OP)
    return sum(per_op.values()) - attention, attention


def analytic_attention_of_step(config: Any, context: int) -> int:
    """QK^T and PV of one decoder step: the canvas against the past it sees and itself."""
    canvas, total = config.canvas_length, 0
    for layer_idx, kind in enumerate(config.layer_types):
        past = context if kind == FULL else min(context, config.sliding_window - 1)
        total += canvas * (past + canvas) * attention_flops_per_key(config, layer_idx)
    return total


@torch.inference_mode()
def test_matmul_flops_of_encoder_and_decoder_equal_the_counted_ones() -> None:
    model = random_model(TINY, seed=0)
    cache = KVCache(TINY, 1, 256)
    slots = torch.zeros(1, dtype=torch.long)
    tokens = 48
    ids = torch.randint(0, TINY.vocab_size, (1, tokens))
    encode_matmuls, _ = counted(lambda: model.encode(ids, torch.arange(tokens)[None], torch.ones(1, tokens,
                                                                                             dtype=torch.bool),
                                                     cache, slots))
    assert encode_matmuls == tokens * sum(layer_matmul_flops(TINY, i) for i in range(TINY.num_hidden_layers))
    canvas = TINY.canvas_length
    context = torch.tensor([tokens])
    soft = torch.randn(1, canvas, TINY.hidden_size)  # a self-conditioning signal: its MLP runs, as in the engine

    def step() -> None:
        logits = model.denoise(torch.randint(0, TINY.vocab_size, (1, canvas)), tokens + torch.arange(canvas)[None],
                               cache, slots, context, soft, context_bound=tokens)
        model.self_conditioning_from_logits(logits, torch.ones(1), torch.logsumexp(logits, -1), 8192)

    step_matmuls, _ = counted(step)
    assert step_matmuls == denoise_step_flops(TINY, tokens) - analytic_attention_of_step(TINY, tokens)


@torch.inference_mode()
def test_decoder_attention_flops_equal_the_counted_ones_where_no_key_is_masked() -> None:
    # All layers full and a context of whole blocks: the decoder reads exactly the keys its tokens see.
    model = random_model(ALL_FULL, seed=1)
    cache = KVCache(ALL_FULL, 1, 256)
    slots = torch.zeros(1, dtype=torch.long)
    context, canvas = 64, ALL_FULL.canvas_length
    ids = torch.randint(0, ALL_FULL.vocab_size, (1, context))
    model.encode(ids, torch.arange(context)[None], torch.ones(1, context, dtype=torch.bool), cache, slots)
    _, attention = counted(lambda: model.denoise(torch.randint(0, ALL_FULL.vocab_size, (1, canvas)),
                                                 context + torch.arange(canvas)[None], cache, slots,
                                                 torch.tensor([context]), None, context_bound=context))
    assert attention == analytic_attention_of_step(ALL_FULL, context) > 0


@pytest.mark.parametrize(("start", "count"), [(0, 1), (0, 40), (3, 9), (10, 30), (15, 1), (16, 5), (200, 77),
                                              (5, 0)])
def test_encode_flops_sum_the_keys_each_token_sees(start: int, count: int) -> None:
    expected = 0
    for position in range(start, start + count):
        for layer_idx, kind in enumerate(TINY.layer_types):
            keys = position + 1 if kind == FULL else min(position + 1, TINY.sliding_window)
            expected += layer_matmul_flops(TINY, layer_idx) + keys * attention_flops_per_key(TINY, layer_idx)
    assert encode_flops(TINY, start, count) == expected
    assert SLIDING in TINY.layer_types  # the sliding sum is exercised


def test_decoder_sliding_layers_see_window_minus_one_past_positions() -> None:
    # A longer context costs more only on full layers once the sliding window is full.
    window = TINY.sliding_window
    grow = denoise_step_flops(TINY, 1000) - denoise_step_flops(TINY, 999)
    per_key_full = sum(attention_flops_per_key(TINY, i) for i in TINY.full_layer_indices)
    assert grow == TINY.canvas_length * per_key_full
    short = denoise_step_flops(TINY, window - 2) - denoise_step_flops(TINY, window - 3)
    assert short == TINY.canvas_length * sum(attention_flops_per_key(TINY, i) for i in range(TINY.num_hidden_layers))


def test_request_flops_follow_the_schedule_of_encodes_and_canvases() -> None:
    canvas = TINY.canvas_length
    two_canvases = request_flops(TINY, prompt_tokens=100, cached_tokens=64, leading_tokens=[5, 7], steps=[4, 3])
    assert two_canvases.encode == (encode_flops(TINY, 64, 36 + 5)  # the uncached prompt and the first leading text
                                   + encode_flops(TINY, 105, canvas + 7))  # the commit and the second leading text
    assert two_canvases.denoise == 4 * denoise_step_flops(TINY, 105) + 3 * denoise_step_flops(TINY, 105 + canvas + 7)
    uncached = request_flops(TINY, 100, 0, [5, 7], [4, 3])
    assert uncached.denoise == two_canvases.denoise and uncached.encode > two_canvases.encode
    assert uncached.total == uncached.encode + uncached.denoise
    with pytest.raises(ValueError, match="per canvas"):
        request_flops(TINY, 100, 0, [0], [4, 4])
    with pytest.raises(ValueError, match="cached_tokens"):
        request_flops(TINY, 10, 11, [0], [4])
