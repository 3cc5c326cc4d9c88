"""KV cache behaviour: sizing, the sliding ring, padding, slot isolation and reuse, read-only decoding,
and a forward that never reads device values on the host."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import preset
from engine.kv_cache import KVCache
from engine.model import DiffusionGemmaModel, moe

# B rows, T tokens, C canvas length, V vocab, W sliding window

CFG = preset("tiny")


@pytest.fixture(scope="module")
def model() -> DiffusionGemmaModel:
    torch.manual_seed(0)
    net = DiffusionGemmaModel(CFG).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
    return net


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


def test_bytes_per_slot_matches_the_allocation() -> None:
    cache = KVCache(CFG, num_slots=3, max_context=100, dtype=torch.bfloat16)
    allocated = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values, cache.ring_positions])
    assert KVCache.bytes_per_slot(CFG, 100, torch.bfloat16) * 3 == allocated
    sliding = cache.keys[CFG.sliding_layer_indices[0]]
    assert sliding.shape[1] == CFG.sliding_window + 1  # ring of `window` plus the scratch row


def test_full_preset_slot_cost_is_dominated_by_full_layers() -> None:
    full = preset("full")
    per_slot = KVCache.bytes_per_slot(full, 4096, torch.bfloat16)
    # 5 full layers x 2 (K,V) x 2 heads x 512 dims x 2 bytes per position, plus 25 sliding rings of 1024+1.
    expected_full = 5 * 2 * 4097 * 2 * 512 * 2
    expected_sliding = 25 * 2 * 1025 * 8 * 256 * 2 + 8 * 1025
    assert per_slot == expected_full + expected_sliding


@torch.no_grad()
def test_ring_keeps_only_the_last_window_positions(model: DiffusionGemmaModel) -> None:
    cache = KVCache(CFG, num_slots=2, max_context=128)
    length = CFG.sliding_window * 2 + 5
    encode(model, cache, [random_ids(length, 1)], [1])
    ring = cache.ring_positions[1, : CFG.sliding_window]
    expected = set(range(length - CFG.sliding_window, length))
    assert set(ring.tolist()) == expected
    assert all(int(p) % CFG.sliding_window == i for i, p in enumerate(ring))
    assert (cache.ring_positions[0, : CFG.sliding_window] == -1).all()  # the other slot is untouched


@torch.no_grad()
def test_padding_writes_nothing(model: DiffusionGemmaModel) -> None:
    cache = KVCache(CFG, num_slots=2, max_context=64)
    encode(model, cache, [random_ids(10, 2), random_ids(4, 3)], [0, 1])
    full = CFG.full_layer_indices[0]
    assert cache.keys[full][1, :4].abs().sum() > 0
    assert (cache.keys[full][1, 4:64] == 0).all()
    assert sorted(cache.ring_positions[1, : CFG.sliding_window].tolist()) == [-1] * (CFG.sliding_window - 4) + [0, 1, 2, 3]


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
        torch.testing.assert_close(batched_enc[b, : len(prompt)], enc[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched_dec[b], denoise(model, alone, canvas[b:b + 1], [len(prompt)], [0])[0],
                                   rtol=1e-5, atol=1e-5)


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
    before = [t.clone() for t in [*cache.keys, *cache.values, cache.ring_positions]]
    denoise(model, cache, torch.zeros(1, CFG.canvas_length, dtype=torch.long), [20], [0])
    after = [*cache.keys, *cache.values, cache.ring_positions]
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
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
