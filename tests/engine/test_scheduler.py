"""Scheduler: admission budgets (canvases, tokens, KV blocks), chunked prefill, commits, joining mid-flight,
freeing slots and blocks, prefix-cache hits (no torch)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from engine.block_manager import BlockManager
from engine.row_groups import group_encode_rows
from engine.scheduler import EncodeWork, Phase, Scheduler, SequenceState, StepPlan
from engine.types import GenerationDefaults, InfillCanvas, SamplingParams, resolve_params

DEFAULTS = GenerationDefaults(stop_token_ids=(1,))


def create_seq(request_id: str, prompt_len: int, num_canvases: int = 1,
               infill: tuple[InfillCanvas, ...] | None = None) -> SequenceState:
    params = resolve_params(SamplingParams(), DEFAULTS, seed=0)
    return SequenceState(request_id=request_id, prompt_ids=tuple(range(10, 10 + prompt_len)), params=params,
                         num_canvases=num_canvases, infill=infill, added_at=0.0)


CANVAS = 32
BLOCK = 16


def create_scheduler(num_blocks: int = 1000, max_canvases: int = 4, max_tokens: int = 100, caching: bool = False,
                     window: int = 64) -> Scheduler:
    kv = BlockManager(num_full_blocks=num_blocks, num_sliding_blocks=4 * max_canvases * 20, block_size=BLOCK,
                      window=window, has_sliding=True, enable_prefix_caching=caching, salt="test")
    return Scheduler(kv, max_canvases_in_flight=max_canvases, max_tokens_per_forward=max_tokens,
                     canvas_length=CANVAS)


def test_scheduler_module_imports_no_torch() -> None:
    for name in ("scheduler.py", "types.py"):
        tree = ast.parse((Path(__file__).parents[2] / "engine" / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert "torch" not in imported, name


def test_prefill_then_denoise_in_the_same_step() -> None:
    sched = create_scheduler()
    sched.add(create_seq("a", 7))
    plan = sched.schedule(now=1.0)
    assert plan.admitted == ("a",)
    assert [(w.token_ids, w.start_position, w.is_prefill) for w in plan.encodes] == [(tuple(range(10, 17)), 0, True)]
    assert [(w.request_id, w.step, w.canvas_start, w.starts_canvas) for w in plan.denoises] == [("a", 1, 7, True)]
    plan = sched.schedule(now=2.0)
    assert plan.encodes == () and [w.step for w in plan.denoises] == [2]


def test_admission_is_bounded_by_canvases_blocks_and_tokens() -> None:
    sched = create_scheduler(max_canvases=2, max_tokens=100)
    for i in range(4):
        sched.add(create_seq(f"r{i}", 10))
    plan = sched.schedule(now=0.0)
    assert plan.admitted == ("r0", "r1") and len(plan.denoises) == 2  # canvas cap
    sched = create_scheduler(num_blocks=5, max_canvases=8, max_tokens=100)
    sched.add(create_seq("x", 5))  # 5 + 32 positions = 3 blocks of 16
    sched.add(create_seq("y", 5))
    assert sched.schedule(now=0.0).admitted == ("x",)  # block cap: 2 blocks left, y needs 3
    sched = create_scheduler(max_canvases=8, max_tokens=12)
    for i in range(3):
        sched.add(create_seq(f"t{i}", 10))
    plan = sched.schedule(now=0.0)
    # token cap on padded tokens: a second 10-token row would make 2 x 10 > 12, so t1 waits
    assert plan.admitted == ("t0",) and plan.num_padded_encoder_tokens == 10
    assert [w.request_id for w in plan.denoises] == ["t0"]
    assert sched.schedule(now=1.0).admitted == ("t1",)


def test_mixed_prompt_lengths_bound_the_padded_encoder_tokens() -> None:
    """Short and long prompts in one step: rows x widest row stays within max_tokens_per_forward, and short
    rows are not padded to the long ones (the long prompts are chunked at the short rows' width)."""
    budget, lengths = 1024, [200, 2000, 150, 1800, 600, 2000, 180, 900]
    sched = create_scheduler(max_canvases=8, max_tokens=budget, window=16)
    for i, length in enumerate(lengths):
        sched.add(create_seq(f"m{i}", length))
    encoded = {f"m{i}": 0 for i in range(len(lengths))}
    useful = padded = 0
    for step in range(100):
        plan = sched.schedule(now=float(step))
        assert plan.num_padded_encoder_tokens <= budget
        for work in plan.encodes:
            assert work.start_position == encoded[work.request_id]  # chunks stay contiguous
            encoded[work.request_id] += len(work.token_ids)
        useful += plan.num_encoder_tokens
        padded += plan.num_padded_encoder_tokens
        if not sched.waiting and all(seq.phase is Phase.DENOISING for seq in sched.running):
            break
    assert encoded == {f"m{i}": length for i, length in enumerate(lengths)}
    assert useful == sum(lengths) and padded <= 1.25 * useful  # padding everything to 2000 would be 2.0x


def test_long_prompt_is_chunked_across_steps_with_contiguous_positions() -> None:
    sched = create_scheduler(max_tokens=16)
    seq = create_seq("long", 40)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        plan = sched.schedule(now=0.0)
        chunks += [(w.start_position, len(w.token_ids)) for w in plan.encodes]
        if _ < 2:
            assert plan.denoises == ()
    assert chunks == [(0, 16), (16, 16), (32, 8)]
    assert [(w.step, w.canvas_start) for w in plan.denoises] == [(1, 40)]


def test_request_joins_while_others_are_mid_canvas() -> None:
    sched = create_scheduler()
    sched.add(create_seq("first", 4))
    sched.schedule(now=0.0)
    sched.schedule(now=0.0)
    sched.add(create_seq("late", 6))
    plan = sched.schedule(now=0.0)
    assert plan.admitted == ("late",)
    assert {(w.request_id, w.step) for w in plan.denoises} == {("first", 3), ("late", 1)}


def test_commit_and_next_canvas_share_a_step() -> None:
    sched = create_scheduler()
    seq = create_seq("a", 5, num_canvases=2)
    sched.add(seq)
    sched.schedule(now=0.0)
    sched.continue_with_next_canvas(seq, [7] * 32)
    plan = sched.schedule(now=0.0)
    assert [(w.start_position, len(w.token_ids), w.is_prefill) for w in plan.encodes] == [(5, 32, False)]
    assert [(w.canvas_index, w.step, w.canvas_start) for w in plan.denoises] == [(1, 1, 37)]


def test_infill_leading_text_is_encoded_before_each_canvas() -> None:
    canvases = tuple(InfillCanvas(leading_token_ids=lead, token_ids=(0,) * 4, is_fixed=(False,) * 4)
                     for lead in [(50, 51), (60,)])
    sched = create_scheduler()
    seq = create_seq("edit", 3, num_canvases=2, infill=canvases)
    sched.add(seq)
    plan = sched.schedule(now=0.0)
    assert plan.encodes[0].token_ids == (10, 11, 12, 50, 51) and plan.denoises[0].canvas_start == 5
    sched.continue_with_next_canvas(seq, [9, 9, 9, 9])
    plan = sched.schedule(now=0.0)
    assert plan.encodes[0].token_ids == (9, 9, 9, 9, 60) and plan.denoises[0].canvas_start == 10


def test_finish_frees_the_slot_for_a_waiting_request() -> None:
    sched = create_scheduler(max_canvases=1)
    a, b = create_seq("a", 3), create_seq("b", 3)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule(now=0.0)
    assert plan.admitted == ("a",) and sched.schedule(now=0.0).admitted == ()
    assert sched.finish(a) == 0 and a.phase is Phase.FINISHED
    plan = sched.schedule(now=0.0)
    assert plan.admitted == ("b",) and plan.encodes[0].slot == 0
    sched.finish(b)
    assert not sched.waiting and not sched.running and list(sched.free_slots) == [0]
    assert sched.kv.stats().full_blocks_used == 0 and not sched.kv.requests


def test_waiting_request_can_be_removed() -> None:
    sched = create_scheduler(max_canvases=1)
    a, b = create_seq("a", 3), create_seq("b", 3)
    sched.add(a)
    sched.add(b)
    sched.schedule(now=0.0)
    assert sched.finish(b) is None
    assert list(sched.waiting) == [] and sched.running == [a]


def test_invalid_budgets_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one canvas in flight"):
        Scheduler(create_scheduler().kv, max_canvases_in_flight=0, max_tokens_per_forward=1, canvas_length=4)


def test_a_request_that_does_not_fit_waits_and_blocks_the_queue_behind_it() -> None:
    """FIFO by blocks: a big head request waits for blocks even when a small one behind it would fit, and is
    admitted as soon as a finishing request frees them; blocks are reserved for every canvas up front."""
    sched = create_scheduler(num_blocks=10, max_canvases=4)
    small, big, tiny = create_seq("small", 30, num_canvases=2), create_seq("big", 60, num_canvases=2), \
        create_seq("tiny", 1)
    for seq in (small, big, tiny):
        sched.add(seq)
    assert sched.schedule(now=0.0).admitted == ("small",)  # 30 + 64 = 94 positions: 6 blocks reserved
    assert sched.kv.stats().full_blocks_used == 6
    assert sched.schedule(now=0.0).admitted == ()  # big needs 8, only 4 are left; tiny waits behind it
    sched.finish(small)
    assert sched.schedule(now=0.0).admitted == ("big",)
    assert sched.kv.stats().full_blocks_used == 8


def test_cached_prefix_is_not_encoded_again() -> None:
    """With prefix caching, a second request with the same prompt encodes only past the cached whole
    blocks; a prompt that is all whole cached blocks starts denoising in the step that admits it."""
    sched = create_scheduler(caching=True, max_tokens=1000)
    first = create_seq("first", 40)
    sched.add(first)
    plan = sched.schedule(now=0.0)
    for work in plan.encodes:
        sched.kv.after_write(work.request_id, work.token_ids)
    sched.finish(first)
    second = create_seq("second", 40)
    sched.add(second)
    plan = sched.schedule(now=1.0)
    assert [(w.start_position, len(w.token_ids)) for w in plan.encodes] == [(32, 8)]  # blocks 0-1 cached
    assert second.cached_prompt_tokens == 32 and plan.denoises[0].canvas_start == 40
    for work in plan.encodes:
        sched.kv.after_write(work.request_id, work.token_ids)
    whole = create_seq("whole", 32)
    sched.add(whole)
    plan = sched.schedule(now=2.0)
    assert plan.admitted == ("whole",) and not [w for w in plan.encodes if w.request_id == "whole"]
    assert [(w.request_id, w.step, w.canvas_start) for w in plan.denoises if w.request_id == "whole"] == \
        [("whole", 1, 32)]


def test_requests_sharing_a_prompt_being_written_wait_for_it_and_others_pass_them() -> None:
    """Arriving together: the first request writes the shared prompt chunk by chunk; one sharing its first
    100 tokens stays waiting (holding no slot or block) only until the 6 shared whole blocks are written,
    while the writer still encodes its own tail, then hits them; one sharing nothing is admitted at once."""
    sched = create_scheduler(caching=True, max_tokens=64, max_canvases=4)
    writer, same = create_seq("writer", 160), create_seq("same", 100)
    other = dataclasses.replace(create_seq("other", 20), prompt_ids=(5,) * 20)
    for seq in (writer, same, other):
        sched.add(seq)
    written_before: list[int] = []  # the writer's tokens in the cache when each step was planned
    admitted: list[tuple[str, ...]] = []
    for step in range(12):
        written_before.append(writer.num_cached)
        plan = sched.schedule(now=float(step))
        admitted.append(plan.admitted)
        for work in plan.encodes:
            sched.kv.after_write(work.request_id, work.token_ids)
    assert admitted[0] == ("writer", "other")
    joined = admitted.index(("same",))
    assert written_before[joined] >= 96 > written_before[joined - 1]  # the step after the shared part is written
    assert written_before[joined] < 160  # the writer was still encoding its own tail
    assert same.cached_prompt_tokens == 96 and writer.cached_prompt_tokens == 0 == other.cached_prompt_tokens
    assert not sched.kv.pending


def test_cancelled_writer_releases_the_requests_waiting_for_its_blocks() -> None:
    """Rows of 64 tokens, two per forward: without the hold both would encode the same prompt at once."""
    sched = Scheduler(create_scheduler(caching=True).kv, max_canvases_in_flight=4, max_tokens_per_forward=128,
                      canvas_length=CANVAS, max_encode_row=64)
    writer, follower = create_seq("writer", 200), create_seq("follower", 200)
    sched.add(writer)
    sched.add(follower)
    plan = sched.schedule(now=0.0)  # the writer's first chunk; the follower waits for it
    assert plan.admitted == ("writer",) and [len(w.token_ids) for w in plan.encodes] == [64]
    for work in plan.encodes:
        sched.kv.after_write(work.request_id, work.token_ids)
    assert sched.schedule(now=1.0).admitted == ()  # block 4 on is still being written
    sched.finish(writer)  # cancelled mid-prefill: its unwritten blocks are no longer pending
    plan = sched.schedule(now=2.0)
    assert plan.admitted == ("follower",) and follower.cached_prompt_tokens == 64


def encode_row(request_id: str, length: int, start: int) -> EncodeWork:
    return EncodeWork(request_id=request_id, slot=0, token_ids=tuple(range(length)), start_position=start,
                      is_prefill=True)


def test_short_rows_are_not_padded_to_a_long_row_in_one_encoder_forward() -> None:
    """A 256-token prompt chunk and nine 32-token commits: two forwards (256 + 9 x 32 tokens), not one of
    10 x 256; every row runs exactly once, and each group is as wide as its widest row."""
    long_row = encode_row("long", 256, 1400)
    commits = tuple(encode_row(f"c{i}", 32 - i % 3, 1400 + 16 * i) for i in range(9))
    plan = StepPlan(encodes=(commits[0], long_row, *commits[1:]))
    groups = plan.encode_groups
    assert [tuple(w.request_id for w in group) for group in groups][0] == ("long",)
    assert sorted(w.request_id for group in groups for w in group) == sorted(w.request_id for w in plan.encodes)
    assert len(groups) == 2 and plan.num_padded_encoder_tokens == 256 + 9 * 32
    assert all(len(group[0].token_ids) == max(len(w.token_ids) for w in group) for group in groups)


def test_rows_of_similar_length_share_one_encoder_forward() -> None:
    rows = tuple(encode_row(f"r{i}", 250 + i, 600) for i in range(6))
    assert len(StepPlan(encodes=rows).encode_groups) == 1
    # a split pays only where the padding saved outweighs one more forward: 40 and 24 tokens stay together
    assert len(group_encode_rows((encode_row("a", 40, 100), encode_row("b", 24, 100)))) == 1
    assert group_encode_rows(()) == () and len(group_encode_rows(rows[:1])) == 1
