"""KV cache behaviour: block sizing, paged tables equal to contiguous slots, sliding layers reading only the
window's blocks, padding, slot isolation and reuse, read-only decoding, models of one layer kind, and a
forward that never reads device values on the host."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import FULL, SLIDING, preset
from engine.kv_cache import BlockTables, KVCache, PagedKVCache
from engine.model import DiffusionGemmaModel, moe
from tests.support.checkpoints import random_model

# B rows, T tokens, C canvas length, V vocab, W sliding window

CFG = preset("tiny")


@pytest.fixture(scope="module")
def model() -> DiffusionGemmaModel:
    return random_model(CFG, seed=0)


def encode(model: DiffusionGemmaModel, cache: KVCache, rows: list[list[int]], slots: list[int],
           starts: list[int] | None = None) -> torch.Tensor:
    width = max(len(r) for r in rows)
    starts = starts or [0] * len(rows)
    ids = torch.full((len(rows), width), CFG.pad_token_id)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)], valid[b, : len(row)] = torch.tensor(row), True
    positions = torch.stack([torch.arange(s, s + width) for s in starts])
    return model.encode(ids, positions, valid, cache, torch.tensor(slots), return_logits=True)


def denoise(model: DiffusionGemmaModel, cache: KVCache, canvas: torch.Tensor, lens: list[int], slots: list[int]):
    positions = torch.stack([torch.arange(n, n + CFG.canvas_length) for n in lens])
    return model.denoise(canvas, positions, cache, torch.tensor(slots), torch.tensor(lens), None)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_block_bytes_match_the_allocation() -> None:
    cache = PagedKVCache(CFG, num_full_blocks=10, num_sliding_blocks=4, block_size=16, dtype=torch.bfloat16)
    allocated = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    per_block = PagedKVCache.block_bytes(CFG, 16, torch.bfloat16)
    assert per_block[FULL] * 11 + per_block[SLIDING] * 5 == allocated  # each pool has one scratch block
    assert cache.keys[CFG.sliding_layer_indices[0]].shape[0] == 5 * 16


def test_full_preset_block_costs() -> None:
    per_block = PagedKVCache.block_bytes(preset("full"), 16, torch.bfloat16)
    # 5 full layers x 2 (K,V) x 16 positions x 2 heads x 512 dims x 2 bytes; 25 sliding layers x 8 heads x 256.
    assert per_block == {FULL: 5 * 2 * 16 * 2 * 512 * 2, SLIDING: 25 * 2 * 16 * 8 * 256 * 2}
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache(CFG, 4, 4, block_size=12)


@torch.no_grad()
def test_scattered_block_tables_equal_contiguous_slots(model: DiffusionGemmaModel) -> None:
    """A paged cache whose blocks are scattered over the pool (and shared rows in one batch) gives the same
    encoder and decoder logits as the slot-addressed cache, for prompts longer than the window."""
    prompts = [random_ids(n, 40 + n) for n in (37, 9)]
    canvas = torch.randint(0, CFG.vocab_size, (2, CFG.canvas_length), generator=torch.Generator().manual_seed(41))
    slot_cache = KVCache(CFG, num_slots=2, max_context=64)
    want_enc = encode(model, slot_cache, prompts, [0, 1])
    want_dec = denoise(model, slot_cache, canvas, [37, 9], [0, 1])
    paged = PagedKVCache(CFG, num_full_blocks=12, num_sliding_blocks=12, block_size=16)
    full = torch.tensor([[7, 2, 11], [4, 12, 12]])  # 12 = scratch: row 1 needs one block
    sliding = torch.tensor([[5, 0, 9], [3, 12, 12]])
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), CFG.pad_token_id)
    valid = torch.zeros(2, width, dtype=torch.bool)
    for b, row in enumerate(prompts):
        ids[b, : len(row)], valid[b, : len(row)] = torch.tensor(row), True
    positions = torch.arange(width).expand(2, -1)
    tables = BlockTables(full=full, sliding=sliding, sliding_first=torch.zeros(2, dtype=torch.long))
    got_enc = model.encode(ids, positions, valid, paged, tables, return_logits=True, context_bound=0)
    for b, n in enumerate((37, 9)):
        torch.testing.assert_close(got_enc[b, :n], want_enc[b, :n], rtol=1e-5, atol=1e-5)
    # The decoder of row 0 (context 37, window 16) sees blocks 1 and 2 only: its sliding table starts there.
    decode_tables = BlockTables(full=full, sliding=torch.tensor([[0, 9], [3, 12]]),
                                sliding_first=torch.tensor([1, 0]))
    positions = torch.stack([torch.arange(n, n + CFG.canvas_length) for n in (37, 9)])
    got_dec = model.denoise(canvas, positions, paged, decode_tables, torch.tensor([37, 9]), None, context_bound=37)
    torch.testing.assert_close(got_dec, want_dec, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sliding_layers_read_only_the_window_blocks(model: DiffusionGemmaModel) -> None:
    """Overwriting sliding-layer blocks wholly before the window changes nothing; overwriting the window's
    last block does (so the check can fail)."""
    length = CFG.sliding_window * 3 + 5
    cache = KVCache(CFG, num_slots=1, max_context=128)
    encode(model, cache, [random_ids(length, 1)], [0])
    canvas = torch.randint(0, CFG.vocab_size, (1, CFG.canvas_length), generator=torch.Generator().manual_seed(2))
    expected = denoise(model, cache, canvas, [length], [0])
    first_visible = (length - CFG.sliding_window + 1) // cache.block_size * cache.block_size
    for layer in CFG.sliding_layer_indices:
        cache.keys[layer][:first_visible] = 1e3
        cache.values[layer][:first_visible] = -1e3
    torch.testing.assert_close(denoise(model, cache, canvas, [length], [0]), expected, rtol=0, atol=0)
    for layer in CFG.sliding_layer_indices:
        cache.keys[layer][length - 1] = 1e3
    assert not torch.equal(denoise(model, cache, canvas, [length], [0]), expected)


@torch.no_grad()
def test_padding_writes_nothing(model: DiffusionGemmaModel) -> None:
    cache = KVCache(CFG, num_slots=2, max_context=64)
    encode(model, cache, [random_ids(10, 2), random_ids(4, 3)], [0, 1])
    full, base = CFG.full_layer_indices[0], cache.blocks_per_slot * cache.block_size  # slot 1's first row
    assert cache.keys[full][base:base + 4].abs().sum() > 0
    assert (cache.keys[full][base + 4:base + 64] == 0).all()
    for layer in CFG.sliding_layer_indices:
        assert (cache.keys[layer][base + 4:base + 64] == 0).all()


@torch.no_grad()
def test_batched_rows_equal_separate_runs(model: DiffusionGemmaModel) -> None:
    prompts = [random_ids(n, 10 + n) for n in (7, 19, 3)]
    canvas = torch.randint(0, CFG.vocab_size, (3, CFG.canvas_length), generator=torch.Generator().manual_seed(5))
    batched_cache = KVCache(CFG, num_slots=4, max_context=64)
    batched_enc = encode(model, batched_cache, prompts, [3, 1, 0])
    batched_dec = denoise(model, batched_cache, canvas, [len(p) for p in prompts], [3, 1, 0])
    for b, prompt in enumerate(prompts):
        alone = KVCache(CFG, num_slots=1, max_context=64)
        enc = encode(model, alone, [prompt], [0])
        dec = denoise(model, alone, canvas[b:b + 1], [len(prompt)], [0])[0]
        # fp32 GEMMs round differently with the number of rows: compare relative to the logit scale.
        for got, want in ((batched_enc[b, : len(prompt)], enc[0]), (batched_dec[b], dec)):
            assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@torch.no_grad()
def test_reset_slot_forgets_the_previous_request(model: DiffusionGemmaModel) -> None:
    canvas = torch.randint(0, CFG.vocab_size, (1, CFG.canvas_length), generator=torch.Generator().manual_seed(6))
    fresh = KVCache(CFG, num_slots=1, max_context=96)
    encode(model, fresh, [random_ids(5, 7)], [0])
    expected = denoise(model, fresh, canvas, [5], [0])

    reused = KVCache(CFG, num_slots=1, max_context=96)
    encode(model, reused, [random_ids(40, 8)], [0])  # a longer earlier request fills the ring
    reused.reset_slot(0)
    encode(model, reused, [random_ids(5, 7)], [0])
    torch.testing.assert_close(denoise(model, reused, canvas, [5], [0]), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slot 1 is outside"):
        reused.reset_slot(1)


@torch.no_grad()
def test_denoise_never_writes_the_cache(model: DiffusionGemmaModel) -> None:
    cache = KVCache(CFG, num_slots=1, max_context=64)
    encode(model, cache, [random_ids(20, 9)], [0])
    before = [t.clone() for t in [*cache.keys, *cache.values]]
    denoise(model, cache, torch.zeros(1, CFG.canvas_length, dtype=torch.long), [20], [0])
    after = [*cache.keys, *cache.values]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_forward_reads_no_device_values_on_the_host() -> None:
    """On the meta device any `.item()`, `.tolist()` or data-dependent shape raises, so a full encode and
    denoise there proves the production (grouped_mm, bf16) path needs no host sync."""
    with torch.device("meta"):
        net = DiffusionGemmaModel(CFG).to(torch.bfloat16)
    for layer in net.layers:
        layer.experts.backend = moe.GROUPED_MM
    cache = KVCache(CFG, 2, 64, device="meta", dtype=torch.bfloat16)
    ids = torch.zeros(2, 7, dtype=torch.long, device="meta")
    slots = torch.zeros(2, dtype=torch.long, device="meta")
    canvas = torch.zeros(2, CFG.canvas_length, dtype=torch.long, device="meta")
    with torch.no_grad():
        logits = net.encode(ids, ids, ids.bool(), cache, slots, return_logits=True, context_bound=16)
        sc = net.self_conditioning_embeds(torch.zeros(2, CFG.canvas_length, CFG.vocab_size, device="meta"))
        out = net.denoise(canvas, canvas, cache, slots, slots, sc, context_bound=16)
    assert logits.shape == (2, 7, CFG.vocab_size) and out.shape == (2, CFG.canvas_length, CFG.vocab_size)
    for layer in net.layers:  # the CPU loop backend reads group sizes on the host: the check must catch it
        layer.experts.backend = moe.LOOP
    with torch.no_grad(), pytest.raises((RuntimeError, NotImplementedError)):
        net.denoise(canvas, canvas, cache, slots, slots, sc, context_bound=16)


def test_cache_and_model_reject_bad_arguments(model: DiffusionGemmaModel) -> None:
    with pytest.raises(ValueError, match="num_slots"):
        KVCache(CFG, num_slots=0, max_context=8)
    cache = KVCache(CFG, num_slots=1, max_context=8)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="context_bound"):
        model.encode(ids, ids, ids.bool(), cache, torch.zeros(1, dtype=torch.long), context_bound=9)
    with pytest.raises(ValueError, match="slots"):
        model.encode(ids, ids, ids.bool(), cache, torch.zeros(2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_forward_runs_without_host_syncs(model: DiffusionGemmaModel) -> None:
    net = DiffusionGemmaModel(CFG).to("cuda", torch.bfloat16).eval()
    net.load_state_dict(model.state_dict())
    cache = KVCache(CFG, 2, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), device="cuda")
    positions = torch.arange(9, device="cuda").expand(2, 9).contiguous()
    slots, lens = torch.tensor([1, 0], device="cuda"), torch.tensor([9, 9], device="cuda")
    canvas = torch.randint(0, CFG.vocab_size, (2, CFG.canvas_length), device="cuda")
    canvas_positions = (9 + torch.arange(CFG.canvas_length, device="cuda")).expand(2, -1).contiguous()
    if torch.cuda.get_device_capability() >= (9, 0):  # Hopper: the production grouped-GEMM path must be taken
        assert moe.default_expert_backend(torch.device("cuda"), torch.bfloat16) == moe.GROUPED_MM
    with torch.inference_mode():
        net.denoise(canvas, canvas_positions, cache, slots, lens, None, context_bound=9)  # warm-up (backend probe)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            net.encode(ids, positions, ids >= 0, cache, slots, context_bound=0)
            logits = net.denoise(canvas, canvas_positions, cache, slots, lens, None, context_bound=9)
            sc = net.self_conditioning_embeds(logits)
            net.denoise(canvas, canvas_positions, cache, slots, lens, sc, context_bound=9)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(logits).all()


def test_training_path_matches_inference_and_backpropagates_through_the_cache(model: DiffusionGemmaModel) -> None:
    """With gradients on, the loop experts and out-of-place softcap run; logits must equal the inference
    path's, and the decoder loss must reach the encoder's K/V projections through the cache."""
    prompt = torch.tensor([random_ids(12, 20)])
    canvas = torch.randint(0, CFG.vocab_size, (1, CFG.canvas_length), generator=torch.Generator().manual_seed(21))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache(CFG, num_slots=1, max_context=12)
        enc = model.encode(prompt, torch.arange(12)[None], prompt >= 0, cache, torch.zeros(1, dtype=torch.long),
                           return_logits=True, context_bound=0)
        dec = denoise(model, cache, canvas, [12], [0])
        return enc, dec

    with torch.inference_mode():
        enc_ref, dec_ref = run()
    model.zero_grad()
    enc, dec = run()
    torch.testing.assert_close(enc, enc_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec, dec_ref, rtol=1e-5, atol=1e-5)
    dec.logsumexp(-1).mean().backward()  # decoder loss only
    # Prompt-only token embeddings reach the decoder loss only through the cached K/V.
    prompt_only = sorted(set(prompt[0].tolist()) - set(canvas[0].tolist()))
    embed_grad = model.embed_tokens.weight.grad
    assert prompt_only and all(embed_grad[i].abs().sum() > 0 for i in prompt_only)
    assert model.layers[0].experts.gate_up_proj.grad.abs().sum() > 0
    model.zero_grad()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=44), max_size=4, unique=True))
def test_chunked_prefill_equals_one_pass(model: DiffusionGemmaModel, cuts: list[int]) -> None:
    """Any split of a prompt (longer than the window) into encoder chunks gives the same cache contents as
    seen by the decoder, and the same per-token encoder logits, as encoding it in one pass."""
    prompt = random_ids(45, 30)
    canvas = torch.randint(0, CFG.vocab_size, (1, CFG.canvas_length), generator=torch.Generator().manual_seed(31))
    with torch.inference_mode():
        whole = KVCache(CFG, num_slots=1, max_context=64)
        expected_enc = encode(model, whole, [prompt], [0])[0]
        expected_dec = denoise(model, whole, canvas, [45], [0])
        chunked = KVCache(CFG, num_slots=2, max_context=64)
        bounds = [0, *sorted(cuts), 45]
        pieces = [encode(model, chunked, [prompt[a:b]], [1], starts=[a])[0]
                  for a, b in zip(bounds, bounds[1:], strict=False)]
        got_dec = denoise(model, chunked, canvas, [45], [1])
    # Different key-set sizes change float summation order: compare relative to the logit scale.
    for got, want in ((torch.cat(pieces), expected_enc), (got_dec, expected_dec)):
        assert ((got - want).abs().max() / want.abs().max()).item() < 5e-5


@pytest.mark.parametrize("layer_types", [(FULL,), (FULL, FULL), (FULL, FULL, FULL)])
def test_models_of_one_layer_kind_encode_and_denoise(layer_types: tuple[str, ...]) -> None:
    """Issue 14: a model whose layers are all of one kind (or a single layer) folds only the masks of the
    kinds it has; batched and chunked encodes still agree with one pass. (All-sliding models are refused by
    the config, as the reference forces the last layer to full attention: tests/engine/test_engine_defects.py.)"""
    config = CFG.replace(layer_types=layer_types, num_hidden_layers=len(layer_types))
    net = random_model(config, seed=3)
    prompt = torch.randint(0, config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    canvas = torch.randint(0, config.vocab_size, (1, config.canvas_length), generator=torch.Generator().manual_seed(5))
    slot = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        whole = KVCache(config, num_slots=1, max_context=64)
        enc = net.encode(prompt, torch.arange(30)[None], prompt >= 0, whole, slot, return_logits=True)
        dec = net.denoise(canvas, torch.arange(30, 30 + config.canvas_length)[None], whole, slot,
                          torch.tensor([30]), None)
        split = KVCache(config, num_slots=1, max_context=64)
        net.encode(prompt[:, :17], torch.arange(17)[None], prompt[:, :17] >= 0, split, slot)
        net.encode(prompt[:, 17:], torch.arange(17, 30)[None], prompt[:, 17:] >= 0, split, slot, context_bound=17)
        dec_split = net.denoise(canvas, torch.arange(30, 30 + config.canvas_length)[None], split, slot,
                                torch.tensor([30]), None, context_bound=30)
    assert enc.shape == (1, 30, config.vocab_size) and torch.isfinite(enc).all()
    assert ((dec_split - dec).abs().max() / dec.abs().max()).item() < 1e-5


def test_kv_pools_split_the_budget_and_reserve_sliding_blocks_per_request() -> None:
    from engine.runner import plan_kv_pools
    from engine.types import EngineConfig

    options = EngineConfig(max_canvases_in_flight=4, max_context=256, block_size=16, sliding_chunk_tokens=64)
    per_block = PagedKVCache.block_bytes(CFG, 16, torch.float32)
    budget = 1 << 20
    sizes = plan_kv_pools(CFG, options, torch.float32, budget)
    # Window 16 spans at most 2 blocks before a context end; a 64-token chunk at most 5 more.
    assert sizes.sliding_per_request == 2 + 4 + 1 and sizes.max_encode_row == 64
    assert sizes.sliding_blocks >= 4 * sizes.sliding_per_request
    assert sizes.full_blocks * per_block[FULL] + sizes.sliding_blocks * per_block[SLIDING] <= budget
    assert sizes.full_blocks == (budget - sizes.sliding_blocks * per_block[SLIDING]) // per_block[FULL]
    with pytest.raises(ValueError, match="raise kv_cache_bytes or lower max_context"):
        plan_kv_pools(CFG, options, torch.float32, 16 * per_block[FULL])
