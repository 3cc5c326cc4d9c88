"""The two GQA paths of attention (CUDA: query heads folded, masks repeated per head; CPU: SDPA's enable_gqa
with unfolded masks) and the additive masks give the same forward, so the CPU tests also cover the CUDA path."""

from __future__ import annotations

import pytest
import torch

from engine.config import preset
from engine.kv_cache import KVCache
from engine.model import attention, transformer
from engine.model.attention import additive_mask
from tests.support.checkpoints import random_model

CFG = preset("tiny")


def test_additive_mask_is_zero_where_attended_and_minus_infinity_elsewhere() -> None:
    mask = torch.tensor([[True, False, True]])
    out = additive_mask(mask, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [[0.0, float("-inf"), 0.0]]


@torch.inference_mode()
def test_folded_and_enable_gqa_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    net = random_model(CFG, seed=0)
    gen = torch.Generator().manual_seed(5)
    lens = [40, 75, 130]
    width = max(lens)
    ids = torch.randint(0, CFG.vocab_size, (len(lens), width), generator=gen)
    valid = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
    canvas = torch.randint(0, CFG.vocab_size, (len(lens), CFG.canvas_length), generator=gen)
    context = torch.tensor(lens)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache(CFG, len(lens), 256)
        slots = torch.arange(len(lens))
        encoded = net.encode(ids, torch.arange(width).expand(len(lens), -1), valid, cache, slots, return_logits=True)
        positions = context[:, None] + torch.arange(CFG.canvas_length)
        return encoded, net.denoise(canvas, positions, cache, slots, context, None)

    cpu_encoded, cpu_denoised = run()
    for module in (attention, transformer):
        monkeypatch.setattr(module, "folds_gqa_queries", lambda device: True)
    folded_encoded, folded_denoised = run()
    real = valid[:, :, None].expand_as(cpu_encoded)
    torch.testing.assert_close(folded_encoded[real], cpu_encoded[real], atol=5e-5, rtol=0)
    torch.testing.assert_close(folded_denoised, cpu_denoised, atol=5e-5, rtol=0)
