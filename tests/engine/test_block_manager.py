"""Block manager (no torch): hash-chained prefix hits, reference counts, LRU eviction, sliding-window release,
caching off, and the pool split of `plan_kv_pools`."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager

BS = 4


def manager(full: int = 20, sliding: int = 20, window: int = 6, caching: bool = True,
            has_sliding: bool = True) -> BlockManager:
    return BlockManager(full, sliding, BS, window, has_sliding, caching, salt="model|float32|4")


def run_prompt(kv: BlockManager, request_id: str, tokens: list[int], total: int) -> int:
    """Admit, write the uncached tokens in one chunk, and return the cached token count."""
    cached = kv.try_admit(request_id, tokens, total)
    assert cached is not None
    kv.prepare_write(request_id, cached, len(tokens) - cached)
    kv.after_write(request_id, tokens[cached:])
    return cached


def test_hits_are_whole_leading_blocks_of_the_same_tokens() -> None:
    kv = manager()
    doc = list(range(100, 114))  # 14 tokens: 3 whole blocks and a partial one
    assert run_prompt(kv, "a", doc, 20) == 0
    assert run_prompt(kv, "b", doc, 20) == 12  # the partial last block is encoded again
    assert run_prompt(kv, "c", doc[:9] + [7, 7, 7, 7], 20) == 8  # diverges inside block 2
    assert run_prompt(kv, "d", [5] + doc[1:], 20) == 0  # the chain: block 0 differs, nothing after it matches
    stats = kv.stats()
    assert stats.query_tokens == 14 + 14 + 13 + 14 and stats.hit_tokens == 12 + 8


def test_shared_blocks_are_reference_counted_and_kept_after_release() -> None:
    kv = manager(full=10)
    doc = list(range(16))
    run_prompt(kv, "a", doc, 16)
    run_prompt(kv, "b", doc, 16)
    assert kv.requests["a"].full == kv.requests["b"].full
    assert kv.stats().full_blocks_used == 4
    kv.free("a")
    assert kv.stats().full_blocks_used == 4  # b still reads them
    kv.free("b")
    assert kv.stats().full_blocks_used == 0
    assert run_prompt(kv, "c", doc, 16) == 16  # unreferenced but cached: still a hit


def test_eviction_takes_least_recently_released_blocks_first() -> None:
    kv = manager(full=8, has_sliding=False)
    first, second = [1] * 16, [2] * 16
    run_prompt(kv, "a", first, 16)
    kv.free("a")
    run_prompt(kv, "b", second, 16)
    kv.free("b")
    run_prompt(kv, "c", [3] * 8, 16)  # needs 4 fresh blocks: the 4 evicted are a's (released first)
    assert kv.stats().evicted_blocks == 4
    kv.free("c")
    assert run_prompt(kv, "d", second, 16) == 16
    assert run_prompt(kv, "e", first, 16) == 0


def test_admission_refuses_what_the_pool_cannot_hold_and_changes_nothing() -> None:
    kv = manager(full=5)
    assert kv.try_admit("a", [1] * 8, 16) is not None
    before = kv.stats()
    assert kv.try_admit("b", [1] * 8, 12) is None  # a wrote nothing yet: 3 fresh blocks needed, 1 free
    assert kv.stats() == before and "b" not in kv.requests
    assert not kv.fits_at_all(24) and kv.fits_at_all(20)


def test_sliding_blocks_are_released_outside_the_window_and_hits_need_the_window_tail() -> None:
    kv = manager(window=6)
    tokens = list(range(40))
    run_prompt(kv, "a", tokens, 40)
    # Context end 40, window 6: readers see positions >= 35, i.e. blocks from 8 on.
    assert sorted(kv.requests["a"].sliding) == [8, 9]
    assert kv.stats().sliding_blocks_used == 2
    kv.free("a")
    # Blocks 0..7 of the sliding pool are cached (released, hashed): a 20-token prefix hits with its tail.
    assert run_prompt(kv, "b", tokens[:20], 24) == 20
    assert sorted(kv.requests["b"].sliding) == [3, 4]


def test_a_hit_without_its_sliding_tail_falls_back_to_a_shorter_prefix() -> None:
    kv = manager(full=40, sliding=3, window=6)  # a tiny sliding pool: old tail blocks get evicted
    tokens = list(range(40))
    kv.try_admit("a", tokens, 40)
    for start in range(0, 40, 4):  # four-token chunks, each written then released
        kv.prepare_write("a", start, 4)
        kv.after_write("a", tokens[start:start + 4])
    kv.free("a")
    # Only the last sliding blocks survived: a 20-token prefix has its full blocks but not its window tail.
    assert kv.stats().evicted_blocks > 0
    assert kv.try_admit("b", tokens[:20], 24) == 0


def test_blocks_an_admitted_request_will_write_hold_back_requests_sharing_them() -> None:
    kv = manager(has_sliding=False)
    shared = list(range(100, 112))  # 3 whole blocks
    writer = shared + [1, 2]
    follower = kv.prefix_hashes(shared + [7, 7, 7, 7])
    assert not kv.waits_for_pending(follower)
    assert kv.try_admit("a", writer, 20) == 0
    assert kv.waits_for_pending(follower)  # a announced blocks 0..2 and wrote none of them yet
    kv.after_write("a", writer[:8])  # a chunk: blocks 0 and 1 written, block 2 still pending
    assert kv.waits_for_pending(follower)
    kv.after_write("a", writer[8:])
    assert not kv.waits_for_pending(follower) and not kv.pending
    assert kv.try_admit("b", shared + [7, 7, 7, 7], 20, hashes=follower) == 12
    assert not kv.waits_for_pending(kv.prefix_hashes([5] * 8))  # unrelated prompts never wait


def test_a_writer_that_leaves_before_writing_releases_the_requests_it_held() -> None:
    kv = manager(has_sliding=False)
    tokens = list(range(100, 116))
    follower = kv.prefix_hashes(tokens)
    kv.try_admit("a", tokens, 20)
    kv.after_write("a", tokens[:4])  # block 0 written, blocks 1..3 pending
    assert kv.waits_for_pending(follower)
    kv.free("a")  # cancelled or failed mid-prefill
    assert not kv.waits_for_pending(follower) and not kv.pending
    assert kv.try_admit("b", tokens, 20, hashes=follower) == 4  # what a wrote is still a hit
    assert kv.waits_for_pending(kv.prefix_hashes(tokens))  # and b now writes the rest for the next one


def test_caching_off_frees_blocks_at_once_and_never_hits() -> None:
    kv = manager(caching=False)
    doc = list(range(16))
    run_prompt(kv, "a", doc, 16)
    kv.free("a")
    assert run_prompt(kv, "b", doc, 16) == 0
    assert kv.stats().query_tokens == 0 and kv.stats().hit_tokens == 0
    assert kv.prefix_hashes(doc) == [] and not kv.pending  # nothing is announced: nothing ever waits


def test_salt_separates_models() -> None:
    one, other = manager(), BlockManager(20, 20, BS, 6, True, True, salt="model|bfloat16|4")
    assert one._chain([1, 2, 3, 4]) != other._chain([1, 2, 3, 4])


@pytest.mark.parametrize("tokens", [[], [1, 2, 3]])
def test_prompts_shorter_than_a_block_never_hit(tokens: list[int]) -> None:
    kv = manager()
    assert run_prompt(kv, "a", tokens or [9], 8) == 0
    assert run_prompt(kv, "b", tokens or [9], 8) == 0
