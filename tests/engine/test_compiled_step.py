"""The decoder step compiled whole (torch.compile fullgraph=True, engine/compiled_step.py) gives the eager
step's tokens, at two batch buckets, with padding rows and padded block tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Engine, EngineConfig, EngineRequest, SamplingParams, StepOutput, load_model
from engine.compiled_step import StepRegion, bucket
from engine.loader import LoadedModel

STEPS = 3


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path) -> LoadedModel:
    return load_model(tiny_checkpoint)


def generate(engine: Engine, count: int) -> list[list[tuple[int, ...]]]:
    """Committed canvases of `count` requests run together (knobs mixed in: one nucleus, one greedy)."""
    knobs = [{}, {"top_p": 0.9, "top_k": 20}, {"temperature": 0.0}]
    ids = [engine.add_request(EngineRequest(prompt=f"request {i}", params=SamplingParams(
        seed=i, max_new_tokens=32, max_denoising_steps=STEPS, fixed_steps=True, **knobs[i % 3])))
        for i in range(count)]
    outputs: list[StepOutput] = []
    for _ in range(100):
        if not engine.has_unfinished():
            break
        outputs += engine.step()
    assert not engine.has_unfinished()
    return [[o.token_ids for o in outputs if o.request_id == rid and o.kind == "canvas"] for rid in ids]


def test_buckets_are_powers_of_two() -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 32, 64]


def test_compile_step_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="compile_step"):
        EngineConfig(compile_step="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_fullgraph_step_gives_the_eager_tokens_at_two_buckets(loaded: LoadedModel) -> None:
    """fullgraph=True fails on any graph break (what would break a CUDA graph). The backend is aot_eager: the
    same trace, functionalisation and graph as inductor's input, without C++ code generation, which takes
    over 20 minutes on the shared 2-core CPU. Batches of exactly a
    bucket's size: a padded row changes the row count of every GEMM, and fp32 GEMMs on this CPU round
    differently at different row counts (as they do for the eager engine at different batch sizes)."""
    config = EngineConfig(max_canvases_in_flight=4, max_context=256, compile_step=False)
    compiled = Engine(loaded, config)
    runner = compiled.runner
    runner.step_region = StepRegion(runner.model, runner.cache, True, config.vocab_chunk_size, backend="aot_eager")
    for count in (1, 4):  # buckets 1 and 4
        want = generate(Engine(loaded, config), count)
        got = generate(compiled, count)
        assert got == want and all(len(canvases) == 1 for canvases in got)
    assert {key[0] for key in runner.step_region._buffers} == {1, 4}  # a graph and buffers per bucket
    padded = generate(compiled, 3)  # 3 rows in bucket 4: one padding row, the same buffers and graph
    assert all(len(canvases) == 1 and len(canvases[0]) == 32 for canvases in padded)
    assert len(runner.step_region._buffers) == 2


def test_engine_default_is_eager_on_cpu(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=2, max_context=256))
    assert not engine.runner.step_region.compiled
    assert Engine(loaded, EngineConfig(max_canvases_in_flight=2, max_context=256, compile_step=True)
                  ).runner.step_region.compiled
