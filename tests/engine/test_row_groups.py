"""Row groups: which decoder rows share a full-layer attention call, and that grouped attention gives the
ungrouped result while reading fewer keys."""

from __future__ import annotations

import pytest
import torch

from engine.config import preset
from engine.kv_cache import KVCache
from engine.model import DiffusionGemmaModel
from engine.row_groups import ATTENTION_GROUP_COST, decoder_row_groups
from tests.support.checkpoints import random_model

CFG = preset("tiny")
C = CFG.canvas_length


def test_equal_contexts_stay_one_group() -> None:
    order, groups = decoder_row_groups([640] * 16, C, 16)
    assert groups == ((16, 640),) and sorted(order) == list(range(16))


def test_spread_contexts_split_into_ascending_runs_that_cover_every_row() -> None:
    lens = [1990, 40, 1200, 700, 60, 1500, 300, 1800, 90, 950, 1100, 20, 400, 1650, 500, 800]
    order, groups = decoder_row_groups(lens, C, 16)
    assert [lens[row] for row in order] == sorted(lens)
    assert sum(rows for rows, _ in groups) == len(lens) and len(groups) > 2
    start = 0
    for rows, bound in groups:
        assert bound == max(lens[row] for row in order[start:start + rows])  # each run reads its longest context
        start += rows
    assert [bound for _, bound in groups] == sorted(bound for _, bound in groups)


def test_a_split_that_saves_less_than_a_group_costs_is_not_made() -> None:
    # Two rows one block apart: splitting saves 16 keys for one row, far less than a group's fixed cost.
    assert ATTENTION_GROUP_COST > 16
    assert decoder_row_groups([1000, 1016], C, 16)[1] == ((2, 1016),)
    assert decoder_row_groups([], C, 16) == ([], ())


@pytest.fixture(scope="module")
def model() -> DiffusionGemmaModel:
    return random_model(CFG, seed=0)


@torch.inference_mode()
def test_grouped_decoder_attention_equals_one_call(model: DiffusionGemmaModel) -> None:
    lens = [20, 37, 180, 400, 401, 700]
    cache = KVCache(CFG, len(lens), 768)
    slots = torch.arange(len(lens))
    gen = torch.Generator().manual_seed(3)
    width = max(lens)
    ids = torch.randint(0, CFG.vocab_size, (len(lens), width), generator=gen)
    valid = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
    model.encode(ids, torch.arange(width).expand(len(lens), -1), valid, cache, slots)
    canvas = torch.randint(0, CFG.vocab_size, (len(lens), C), generator=gen)
    context = torch.tensor(lens)
    positions = context[:, None] + torch.arange(C)
    whole = model.denoise(canvas, positions, cache, slots, context, None, context_bound=width)
    groups = ((2, 37), (1, 180), (2, 401), (1, 700))
    read_widths: list[tuple[int, int]] = []
    plain_read = cache.read

    def recording_read(layer_idx: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if CFG.layer_types[layer_idx] == "full_attention":
            read_widths.append(tuple(rows.shape))
        return plain_read(layer_idx, rows)

    cache.read = recording_read  # type: ignore[method-assign]
    grouped = model.denoise(canvas, positions, cache, slots, context, None, context_bound=width, row_groups=groups)
    del cache.read
    # each group reads whole blocks up to its own bound, not the batch's 704 positions
    assert read_widths[:4] == [(2, 48), (1, 192), (2, 416), (1, 704)]
    assert len(read_widths) == 4 * len(CFG.full_layer_indices)
    torch.testing.assert_close(grouped, whole, atol=2e-5, rtol=0)
    assert torch.equal(grouped.argmax(-1), whole.argmax(-1))
    # A group bound below a row's context drops keys that row must see: the result changes (the bound matters).
    short = model.denoise(canvas, positions, cache, slots, context, None, context_bound=width,
                          row_groups=((2, 37), (1, 180), (2, 401), (1, 400)))
    assert not torch.allclose(short[5], whole[5], atol=1e-3)
    with pytest.raises(ValueError, match="row_groups"):
        model.denoise(canvas, positions, cache, slots, context, None, context_bound=width, row_groups=((2, 37), (1, 700)))
