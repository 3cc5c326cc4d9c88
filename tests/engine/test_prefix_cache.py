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
    pools = plan_kv_pools(loaded.config, options, torch.float32, 1 << 40)
    sliding = pools.sliding_blocks - pools.sliding_tail_blocks  # a budget this tight keeps no extra tails
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


# ----- requests arriving together: a shared prompt being written holds back the requests that share it -----

def arrivals_engine(loaded: LoadedModel, caching: bool) -> Engine:
    """Room for 8 requests at once; prefill in chunks of 32 tokens, so a long prompt is written over steps."""
    return Engine(loaded, EngineConfig(max_canvases_in_flight=8, max_context=512, sliding_chunk_tokens=32,
                                       enable_prefix_caching=caching))


def run_together(engine: Engine, requests: dict[str, EngineRequest], abort_after: dict[str, int] | None = None
                 ) -> tuple[dict[str, list[int]], dict[str, StepOutput], int]:
    """Add every request before the first step, step to the end (aborting `abort_after` ids after that many
    steps); returns each request's committed tokens, its finished output and the encoder tokens computed."""
    for name, request in requests.items():
        engine.add_request(request, request_id=name)
    tokens: dict[str, list[int]] = {name: [] for name in requests}
    ends: dict[str, StepOutput] = {}
    encoder_tokens = 0
    for step in range(1, 1001):
        for name, after in (abort_after or {}).items():
            if step == after + 1:
                engine.abort(name)
        for out in engine.step():
            if out.kind == "canvas":
                tokens[out.request_id] += list(out.token_ids)
            elif out.kind == "finished":
                ends[out.request_id] = out
        encoder_tokens += engine.last_step_stats.num_encoder_tokens
        if not engine.has_unfinished():
            return tokens, ends, encoder_tokens
    raise AssertionError("engine still busy after 1000 steps")


def test_requests_arriving_together_encode_a_shared_prompt_once(loaded: LoadedModel) -> None:
    """8 requests added at once sharing a 160-token prompt (10 whole blocks), each with its own 10-token
    question: the first encodes the shared part, the 7 others wait for it and encode only their questions."""
    shared = doc_ids(160, 5)
    requests = {f"r{i}": EngineRequest(prompt_token_ids=tuple(shared + doc_ids(10, 100 + i)), params=params(i))
                for i in range(8)}
    tokens_on, ends_on, computed_on = run_together(engine_on := arrivals_engine(loaded, True), requests)
    tokens_off, _, computed_off = run_together(arrivals_engine(loaded, False), requests)
    assert tokens_on == tokens_off
    assert computed_off == 8 * 170
    assert computed_on == 170 + 7 * 10  # one shared prompt + 8 questions
    assert [ends_on[f"r{i}"].stats.cached_prompt_tokens for i in range(8)] == [0] + [160] * 7
    assert engine_on.kv_stats().hit_tokens == 7 * 160 and not engine_on.runner.kv.pending


@pytest.mark.slow
def test_simultaneous_arrivals_give_identical_tokens_with_the_cache_on_and_off(loaded: LoadedModel) -> None:
    """Generate, chat and edit requests all added at once: identical prompts ending in a partial block, prompts
    diverging inside a block, a two-canvas request, two edits of one document at different spans."""
    doc = doc_ids(140, 1)
    system = {"role": "system", "content": "You are a careful assistant. " * 4}
    requests = {
        **{f"same{i}": EngineRequest(prompt_token_ids=tuple(doc[:50]), params=params(i, 64)) for i in range(3)},
        "diverge_a": EngineRequest(prompt_token_ids=tuple(doc[:20] + doc_ids(30, 9)), params=params(4)),
        "diverge_b": EngineRequest(prompt_token_ids=tuple(doc[:20] + doc_ids(30, 10)), params=params(5)),
        "chat1": EngineRequest(messages=[system, {"role": "user", "content": "first"}], params=params(6)),
        "chat2": EngineRequest(messages=[system, {"role": "user", "content": "second"}], params=params(7)),
        "edit_later": edit(doc[:80], [([], doc[80:112], 4)], 8),
        "edit_earlier": edit(doc[:40], [([], doc[40:72], 6)], 9),
    }
    tokens_on, ends_on, computed_on = run_together(arrivals_engine(loaded, True), requests)
    tokens_off, _, computed_off = run_together(arrivals_engine(loaded, False), requests)
    assert tokens_on == tokens_off
    cached = {name: end.stats.cached_prompt_tokens for name, end in ends_on.items()}
    assert cached["same0"] == 0 and cached["same1"] == cached["same2"] == 48
    assert cached["diverge_a"] == cached["diverge_b"] == 16  # block 0 is same0's, written while they waited
    assert cached["chat1"] + cached["chat2"] > 0 and cached["edit_earlier"] == 32
    assert computed_on == computed_off - sum(cached.values())


def test_cancelling_the_writer_releases_the_requests_it_held(loaded: LoadedModel) -> None:
    """The writer of a shared prompt is aborted mid-prefill (after 2 chunks of 32): the first waiting request
    reuses what it wrote and writes the rest, the second waits for that and hits the whole shared part."""
    shared = doc_ids(128, 6)
    requests = {"writer": EngineRequest(prompt_token_ids=tuple(shared + doc_ids(72, 7)), params=params(1)),
                "first": EngineRequest(prompt_token_ids=tuple(shared + doc_ids(8, 8)), params=params(2)),
                "second": EngineRequest(prompt_token_ids=tuple(shared + doc_ids(8, 9)), params=params(3))}
    tokens_on, ends_on, _ = run_together(arrivals_engine(loaded, True), requests, abort_after={"writer": 2})
    tokens_off, ends_off, _ = run_together(arrivals_engine(loaded, False), requests, abort_after={"writer": 2})
    assert ends_on["writer"].finish_reason == "aborted" == ends_off["writer"].finish_reason
    assert ends_on["first"].stats.cached_prompt_tokens == 64 and ends_on["second"].stats.cached_prompt_tokens == 128
    assert ends_on["first"].finish_reason == "length" == ends_on["second"].finish_reason
    assert tokens_on == tokens_off


def test_short_uncached_tails_and_a_long_prompt_run_as_separate_encoder_forwards(loaded: LoadedModel) -> None:
    """Edits of a cached document (each encodes only its partial last block, 4-14 tokens) arrive with a new
    200-token prompt: the step encodes the long prompt and the short tails in two forwards instead of padding
    every tail to 200 tokens, and every request gets the tokens it gets alone with the cache off."""
    doc, other = doc_ids(232, 11), doc_ids(200, 12)
    requests = {f"edit{end}": edit(doc[:end], [([], doc[end:end + 32], 3)], end) for end in (60, 100, 150, 190)}
    requests["new"] = EngineRequest(prompt_token_ids=tuple(other), params=params(13))
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=8, max_context=512))
    run_phase(engine, {"open": edit(doc[:200], [([], doc[200:232], 2)], 1)})  # the document is cached
    forwards: list[int] = []
    encode = engine.runner._encode
    engine.runner._encode = lambda group: (forwards.append(len(group)), encode(group))  # a spy: counts, then runs
    tokens, ends, computed = run_together(engine, requests)
    assert forwards[:2] == [1, 4]  # first step: the 200-token prompt alone, then the four tails together
    assert computed == 200 + (60 - 48) + (100 - 96) + (150 - 144) + (190 - 176)
    alone_engine = Engine(loaded, EngineConfig(max_context=512, enable_prefix_caching=False))
    for name, request in requests.items():  # one at a time
        assert tokens[name] == run_together(alone_engine, {name: request})[0][name], name
    assert all(end.finish_reason == "stop" for name, end in ends.items() if name != "new")


def test_a_budget_beyond_the_full_pool_keeps_window_tails_so_edits_of_many_documents_hit(
        loaded: LoadedModel) -> None:
    """Six 200-token documents are opened one after another, then each is edited at position 100: every edit
    reuses its document's 6 leading blocks, because the budget the (capped) full pool leaves over keeps the
    sliding layers' window tails of cached blocks (with only the running requests' sliding blocks, the first
    documents' tails were evicted and their edits re-encoded from the start)."""
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=2, max_context=512, kv_cache_bytes=1 << 28))
    sizes = engine.runner.pools
    assert sizes.sliding_tail_blocks > 6 * 13  # room for every document's window tails
    per_block = PagedKVCache.block_bytes(loaded.config, 16, torch.float32)  # and never more than can be read:
    assert sizes.sliding_tail_blocks <= sizes.full_blocks  # one tail block per full block,
    assert sizes.sliding_tail_blocks * per_block[SLIDING] <= sizes.full_blocks * per_block[FULL]  # its bytes
    docs = [doc_ids(232, 20 + i) for i in range(6)]
    for i, doc in enumerate(docs):
        run_phase(engine, {f"open{i}": edit(doc[:200], [([], doc[200:232], 2)], i)})
    ends = {o.request_id: o for o in run_phase(engine, {f"edit{i}": edit(doc[:100], [([], doc[100:132], 3)], i)
                                                        for i, doc in enumerate(docs)}) if o.kind == "finished"}
    assert [ends[f"edit{i}"].stats.cached_prompt_tokens for i in range(6)] == [96] * 6
