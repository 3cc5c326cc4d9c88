"""Parity with the `transformers` reference: random tiny checkpoints saved by `save_pretrained` (single file
and sharded) are loaded with our loader, and our encoder / decoder logits are compared in fp32.

Relative error = max |ours - ref| / max |ref| over the compared logits; the bar is 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kv_cache import KVCache
from engine.loader import LoadedModel, load_model
from engine.model import moe, transformer

# B rows, T tokens, C canvas length, V vocab, D hidden

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


class ReferenceRow:
    """One request run through the reference with its dynamic cache (the oracle)."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache = transformers.DynamicCache(config=model.config.text_config)
        self.length = 0

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.length, self.length + ids.numel())[None]
        hidden = self.model.model.encoder(input_ids=ids[None], cache=self.cache, position_ids=positions).last_hidden_state
        self.length += ids.numel()
        cap = self.model.config.text_config.final_logit_softcapping
        return torch.tanh(self.model.lm_head(hidden).float() / cap)[0] * cap

    def denoise(self, canvas: torch.Tensor, sc_logits: torch.Tensor | None = None) -> torch.Tensor:
        sc = None if sc_logits is None else sc_logits[None]
        return self.model(decoder_input_ids=canvas[None], cache=self.cache, self_conditioning_logits=sc).logits[0]


def reference_from(folder: Path):
    return transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["single", "sharded"])
def pair(request, reference_checkpoint: Path, reference_sharded_checkpoint: Path) -> tuple[LoadedModel, object]:
    folder = reference_checkpoint if request.param == "single" else reference_sharded_checkpoint
    if request.param == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
    return load_model(folder), reference_from(folder)


def encode_batch(loaded: LoadedModel, cache: KVCache, rows: list[torch.Tensor], starts: list[int],
                 slots: list[int]) -> torch.Tensor:
    """Right-padded batched encode of `rows` starting at `starts`; returns logits [B, T, V]."""
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), loaded.config.pad_token_id)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[b, : row.numel()], valid[b, : row.numel()] = row, True
        positions[b] = torch.arange(start, start + width)
    return loaded.model.encode(ids, positions, valid, cache, torch.tensor(slots), return_logits=True)


def denoise_batch(loaded: LoadedModel, cache: KVCache, canvases: torch.Tensor, context_lens: list[int],
                  slots: list[int], sc_logits: torch.Tensor | None = None) -> torch.Tensor:
    c = canvases.shape[1]
    positions = torch.stack([torch.arange(n, n + c) for n in context_lens])
    sc = None if sc_logits is None else loaded.model.self_conditioning_embeds(sc_logits)
    return loaded.model.denoise(canvases, positions, cache, torch.tensor(slots), torch.tensor(context_lens), sc,
                                context_bound=max(context_lens))


@torch.no_grad()
def test_batched_encoder_and_decoder_logits_match_reference(pair) -> None:
    loaded, ref = pair
    vocab, canvas_len = loaded.config.vocab_size, loaded.config.canvas_length
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=gen) for n in (5, 12, 9)]
    slots = [2, 0, 1]
    cache = KVCache(loaded.config, num_slots=3, max_context=96)
    ours = encode_batch(loaded, cache, prompts, [0, 0, 0], slots)
    refs = [ReferenceRow(ref) for _ in prompts]
    for b, prompt in enumerate(prompts):
        assert relative_error(ours[b, : prompt.numel()], refs[b].encode(prompt)) < TOLERANCE

    canvases = torch.randint(0, vocab, (3, canvas_len), generator=gen)
    lens = [p.numel() for p in prompts]
    plain = denoise_batch(loaded, cache, canvases, lens, slots)
    sc_logits = 4 * torch.randn(3, canvas_len, vocab, generator=gen)
    conditioned = denoise_batch(loaded, cache, canvases, lens, slots, sc_logits)
    for b in range(3):
        assert relative_error(plain[b], refs[b].denoise(canvases[b])) < TOLERANCE
        assert relative_error(conditioned[b], refs[b].denoise(canvases[b], sc_logits[b])) < TOLERANCE
    assert relative_error(conditioned, plain) > 1e-3  # the signal really changes the output


@torch.no_grad()
def test_prompt_longer_than_window_with_chunked_prefill_and_commits(reference_checkpoint: Path) -> None:
    loaded, ref = load_model(reference_checkpoint), reference_from(reference_checkpoint)
    cfg = loaded.config
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (cfg.sliding_window * 2 + 7,), generator=gen)
    row, cache = ReferenceRow(ref), KVCache(cfg, num_slots=2, max_context=160)
    ref_prompt = row.encode(prompt)
    # Our prefill in two chunks that each straddle the window: the second reads the first from the cache.
    split = cfg.sliding_window + 3
    first = encode_batch(loaded, cache, [prompt[:split]], [0], [1])[0]
    second = encode_batch(loaded, cache, [prompt[split:]], [split], [1])[0]
    assert relative_error(torch.cat([first, second]), ref_prompt) < TOLERANCE

    context, sc_logits = prompt.numel(), None
    for _ in range(2):  # two canvases: denoise, then commit (encode the canvas at its positions)
        canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=gen)
        ours = denoise_batch(loaded, cache, canvas[None], [context], [1], sc_logits)[0]
        assert relative_error(ours, row.denoise(canvas, None if sc_logits is None else sc_logits[0])) < TOLERANCE
        committed = encode_batch(loaded, cache, [canvas], [context], [1])[0]
        assert relative_error(committed, row.encode(canvas)) < TOLERANCE
        context += cfg.canvas_length
        sc_logits = 3 * torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=gen)


@torch.no_grad()
def test_our_checkpoint_loads_in_transformers_with_the_same_logits(tiny_checkpoint: Path) -> None:
    loaded, ref = load_model(tiny_checkpoint), reference_from(tiny_checkpoint)
    cfg = loaded.config
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (20,), generator=gen)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=gen)
    cache, row = KVCache(cfg, num_slots=1, max_context=64), ReferenceRow(ref)
    assert relative_error(encode_batch(loaded, cache, [prompt], [0], [0])[0], row.encode(prompt)) < TOLERANCE
    assert relative_error(denoise_batch(loaded, cache, canvas, [20], [0])[0], row.denoise(canvas[0])) < TOLERANCE


@torch.no_grad()
def test_vocabulary_chunked_products_match_unchunked_maths(reference_checkpoint: Path, monkeypatch) -> None:
    loaded = load_model(reference_checkpoint)
    monkeypatch.setattr(transformer, "VOCAB_CHUNK", 100)  # 512 is not a multiple: exercises a ragged last chunk
    logits = 5 * torch.randn(2, 3, loaded.config.vocab_size, generator=torch.Generator().manual_seed(3))
    weight = loaded.model.embed_tokens.weight
    expected = torch.softmax(logits, -1) @ weight * loaded.config.hidden_size ** 0.5
    assert relative_error(loaded.model.self_conditioning_embeds(logits), expected) < 1e-5
    hidden = torch.randn(2, 3, loaded.config.hidden_size, generator=torch.Generator().manual_seed(4))
    cap = loaded.config.final_logit_softcapping
    head = loaded.model.norm(hidden) @ weight.T
    assert relative_error(loaded.model.logits(hidden), cap * torch.tanh(head / cap)) < 1e-5


@torch.no_grad()
def test_bf16_error_is_no_worse_than_the_reference_in_bf16(tiny_checkpoint: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 512, (12,), generator=gen)
    canvas = torch.randint(0, 512, (1, 32), generator=gen)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded, row = load_model(tiny_checkpoint, dtype=dtype), ReferenceRow(reference_from(tiny_checkpoint).to(dtype))
        cache = KVCache(loaded.config, num_slots=1, max_context=64, dtype=dtype)
        encoded = encode_batch(loaded, cache, [prompt], [0], [0])[0]
        results[dtype] = (encoded, denoise_batch(loaded, cache, canvas, [12], [0])[0],
                          row.encode(prompt), row.denoise(canvas[0]))
    exact = results[torch.float32]
    for i in (0, 1):  # encoder, decoder
        ours = relative_error(results[torch.bfloat16][i], exact[i + 2])
        reference = relative_error(results[torch.bfloat16][i + 2], exact[i + 2])
        assert results[torch.bfloat16][i].dtype == torch.float32
        assert ours < 1.5 * reference + 1e-3, (i, ours, reference)


@pytest.mark.skipif(not moe._grouped_mm_works("cpu", torch.float32), reason="no CPU grouped_mm in this torch")
@torch.no_grad()
def test_grouped_mm_and_loop_experts_agree() -> None:
    torch.manual_seed(0)
    experts = moe.Experts(num_experts=8, hidden_size=32, expert_size=16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(50, 32)
    # Expert 5 gets no token: empty groups must work on both paths.
    chosen = torch.randint(0, 5, (50, 2))
    weights = torch.rand(50, 2)
    experts.backend = moe.GROUPED_MM
    grouped = experts(x, weights, chosen)
    experts.backend = moe.LOOP
    looped = experts(x, weights, chosen)
    manual = torch.zeros_like(x)
    for n in range(50):
        for k in range(2):
            gate, up = (experts.gate_up_proj[chosen[n, k]] @ x[n]).split(16)
            manual[n] += weights[n, k] * (experts.down_proj[chosen[n, k]] @ (moe.gelu_tanh(gate) * up))
    assert relative_error(grouped, manual) < 1e-5
    assert relative_error(looped, manual) < 1e-5


@torch.no_grad()
def test_block_aligned_and_dense_experts_agree_with_the_loop() -> None:
    """The traceable fp32 expert paths (moe.BLOCKED, moe.DENSE) against the loop: empty experts, a group larger
    than a block, and few tokens (where blocks would not save FLOPs, forward takes the dense path)."""
    torch.manual_seed(0)
    experts = moe.Experts(num_experts=8, hidden_size=32, expert_size=16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    for tokens, used in ((50, 5), (200, 3), (3, 8)):  # 200 tokens on 3 experts: groups of ~133 pairs, 9 blocks
        x, weights = torch.randn(tokens, 32), torch.rand(tokens, 2)
        chosen = torch.stack([torch.randperm(used)[:2] for _ in range(tokens)])
        experts.backend = moe.LOOP
        looped = experts(x, weights, chosen)
        assert relative_error(experts._blocked(x, weights, chosen), looped) < 1e-6
        assert relative_error(experts._dense(x, weights, chosen), looped) < 1e-6
        experts.backend = moe.BLOCKED
        assert relative_error(experts(x, weights, chosen), looped) < 1e-6
    assert moe.blocked_rows(100, 8, 16) == (100 // 16 + 8) * 16
    # 3 tokens: too few to gain from blocks, so forward runs dense
    assert 2 * moe.blocked_rows(6, 8, moe.EXPERT_BLOCK) > 3 * 8


@torch.no_grad()
def test_other_shapes_match_reference(tmp_path: Path) -> None:
    """No GQA on sliding layers, 2 kv heads on full layers, a full first layer, top-3 routing, window 8."""
    from tests.support.checkpoints import save_reference_checkpoint

    folder = save_reference_checkpoint(
        tmp_path / "variant", seed=7, num_key_value_heads=4, num_global_key_value_heads=2, top_k_experts=3,
        sliding_window=8, layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                       "full_attention", "sliding_attention", "full_attention"])
    loaded, ref = load_model(folder), reference_from(folder)
    assert loaded.config.layer_types[0] == "full_attention" and loaded.config.num_global_key_value_heads == 2
    gen = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, loaded.config.vocab_size, (21,), generator=gen)
    canvas = torch.randint(0, loaded.config.vocab_size, (1, loaded.config.canvas_length), generator=gen)
    cache, row = KVCache(loaded.config, num_slots=1, max_context=64), ReferenceRow(ref)
    assert relative_error(encode_batch(loaded, cache, [prompt], [0], [0])[0], row.encode(prompt)) < TOLERANCE
    assert relative_error(denoise_batch(loaded, cache, canvas, [21], [0])[0], row.denoise(canvas[0])) < TOLERANCE
