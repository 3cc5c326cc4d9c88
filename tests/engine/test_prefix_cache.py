"""Prefix caching end to end on the tiny preset (CPU, fp32): the same seeded generate, chat and edit requests
give identical tokens with the cache on and off, while the cache really serves prompt tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig, EngineRequest, InfillCanvas, SamplingParams, StepOutput, load_model
from engine.config import FULL, SLIDING
from engine.kv_cache import PagedKVCache
from engine.loader import LoadedModel
from engine.runner import plan_kv_pools

# C canvas length (32 in the tiny preset), W sliding window (16)

STEPS = 2
IN_FLIGHT = 6
MAX_CONTEXT = 256
POOL_BLOCKS = {16: 36, 8: 56}  # full-pool blocks: small enough that the session evicts cached blocks


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path) -> LoadedModel:
    return load_model(tiny_checkpoint)


def tight_budget(loaded: LoadedModel, block_size: int, full_blocks: int) -> int:
    """A byte budget whose full pool holds about `full_blocks` blocks: small enough to force evictions."""
    options = EngineConfig(max_canvases_in_flight=IN_FLIGHT, max_context=MAX_CONTEXT, block_size=block_size)
    per_block = PagedKVCache.block_bytes(loaded.config, block_size, torch.float32)
    sliding = plan_kv_pools(loaded.config, options, torch.float32, 1 << 40).sliding_blocks
    return sliding * per_block[SLIDING] + full_blocks * per_block[FULL]


def params(seed: int, max_new_tokens: int = 32) -> SamplingParams:
    return SamplingParams(seed=seed, max_new_tokens=max_new_tokens, max_denoising_steps=STEPS)


def doc_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def edit(prefix: list[int], canvases: list[tuple[list[int], list[int], int]], seed: int) -> EngineRequest:
    """An edit-shaped request: `prefix` as the prompt, then canvases of (leading ids, canvas ids, free count):
    the first `free` positions of each canvas are regenerated, the rest are the document's text after them."""
    infill = tuple(InfillCanvas(leading_token_ids=tuple(lead), token_ids=tuple(ids),
                                is_fixed=tuple(i >= free for i in range(len(ids))))
                   for lead, ids, free in canvases)
    return EngineRequest(prompt_token_ids=tuple(prefix), infill=infill, params=params(seed))


def run_phase(engine: Engine, requests: dict[str, EngineRequest]) -> list[StepOutput]:
    for name, request in requests.items():
        engine.add_request(request, request_id=name)
    outputs: list[StepOutput] = []
    for _ in range(1000):
        if not engine.has_unfinished():
            return outputs
        outputs += engine.step()
    raise AssertionError("engine still busy after 1000 steps")


def run_session(loaded: LoadedModel, caching: bool, block_size: int) -> tuple[dict, dict, Engine]:
    """Three phases of requests; each phase finishes before the next, so later ones can hit earlier blocks."""
    engine = Engine(loaded, EngineConfig(
        max_canvases_in_flight=IN_FLIGHT, max_context=MAX_CONTEXT, block_size=block_size,
        enable_prefix_caching=caching, kv_cache_bytes=tight_budget(loaded, block_size, POOL_BLOCKS[block_size])))
    doc = doc_ids(140, 1)
    system = {"role": "system", "content": "You are a careful assistant. " * 4}
    phases: list[dict[str, EngineRequest]] = [
        {"gen": EngineRequest(prompt_token_ids=tuple(doc[:50]), params=params(1, 64)),
         "chat1": EngineRequest(messages=[system, {"role": "user", "content": "first"}], params=params(2)),
         "edit1": edit(doc[:30], [(doc[30:30], doc[30:62], 5)], 3)},
        {"gen_again": EngineRequest(prompt_token_ids=tuple(doc[:50]), params=params(1, 64)),  # partial last block
         "diverge": EngineRequest(prompt_token_ids=tuple(doc[:20] + doc_ids(30, 9)), params=params(4)),
         "chat2": EngineRequest(messages=[system, {"role": "user", "content": "second"}], params=params(5)),
         "edit_later": edit(doc[:80], [([], doc[80:112], 4)], 6),  # a later span of the same document
         "edit_two": edit(doc[:10], [([], doc[10:42], 3), (doc[42:45], doc[45:77], 2)], 7)},
        {"edit_earlier": edit(doc[:40], [([], doc[40:72], 6)], 8)},
    ]
    outputs: list[StepOutput] = []
    for phase in phases:
        outputs += run_phase(engine, phase)
        if "gen" in phase:  # a continuation of a finished request reuses its committed canvas's blocks
            first_canvas = next(o for o in outputs if o.request_id == "gen" and o.kind == "canvas")
            phases[1]["continue"] = EngineRequest(prompt_token_ids=tuple(doc[:50]) + first_canvas.token_ids,
                                                  params=params(12))
    tokens = {o.request_id: [] for o in outputs}
    for out in outputs:
        if out.kind == "canvas":
            tokens[out.request_id] += list(out.token_ids)
    ends = {o.request_id: o for o in outputs if o.kind == "finished"}
    assert all(end.finish_reason in ("stop", "length") for end in ends.values()), ends
    return tokens, ends, engine


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [16, 8])
def test_cache_on_and_off_give_identical_tokens(loaded: LoadedModel, block_size: int) -> None:
    """Generate, chat and edit jobs: hits on a partial last block, requests sharing and diverging inside a
    block, a continuation through committed canvases, edits at later and earlier spans of one document, all
    under eviction pressure; window 16 with blocks of 16 and 8 positions, prompts longer than the window."""
    tokens_on, ends_on, engine_on = run_session(loaded, True, block_size)
    tokens_off, ends_off, engine_off = run_session(loaded, False, block_size)
    assert tokens_on == tokens_off
    cached = {name: end.stats.cached_prompt_tokens for name, end in ends_on.items()}
    assert cached["gen"] == 0 and cached["gen_again"] == 48  # 50 tokens: the partial last block is re-encoded
    assert cached["diverge"] == 16 // block_size * block_size  # shares 20 tokens: up to the divergent block
    assert cached["chat2"] > 0 and cached["edit_later"] >= 48 and cached["edit_earlier"] >= 32
    # The continuation reuses the prompt's blocks; with 16-position blocks also most of the committed canvas
    # (with 8, the pool is tighter and LRU has evicted those blocks, released before the prompt's).
    assert cached["continue"] >= (80 if block_size == 16 else 48)
    assert all(end.stats.cached_prompt_tokens == 0 for end in ends_off.values())
    stats = engine_on.kv_stats()
    assert stats.full_blocks_total == POOL_BLOCKS[block_size]
    assert stats.evicted_blocks > 0 and stats.hit_tokens == sum(cached.values())
    assert stats.full_blocks_used == 0 == engine_off.kv_stats().full_blocks_used  # everything released


def test_prefix_hits_save_encoder_tokens(loaded: LoadedModel) -> None:
    """The second of two identical requests encodes only its partial last block."""
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=2, max_context=MAX_CONTEXT))
    prompt = tuple(doc_ids(70, 3))
    run_phase(engine, {"a": EngineRequest(prompt_token_ids=prompt, params=params(1))})
    engine.add_request(EngineRequest(prompt_token_ids=prompt, params=params(1)), request_id="b")
    engine.step()
    assert engine.last_step_stats.num_encoder_tokens == 70 - 64
